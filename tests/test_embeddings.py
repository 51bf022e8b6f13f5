"""Embeddings (LLM.embed, engine/embed.py) against transformers on a tiny random checkpoint: our
vector is transformers' last hidden state (after the final norm) at the last token, normalized the
same way, float32 within 1e-5, for text, an image, image + text, token ids and a video; inputs of different lengths
packed into one forward equal each run alone; no KV-cache blocks are taken; the checkpoint's
sentence-transformers files pick the pooling."""

import json

import pytest
import torch
import torch.nn.functional as F

from qwen2vl.embedding import END_TOKEN, Pooling, read_pooling
from qwen2vl.engine.llm import LLM
from tests.helpers.parity import CONVERSATIONS, img, make_checkpoint, user


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_ckpt")
    hf = make_checkpoint(folder)
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_gib=0.02, max_model_len=1024,
              max_num_batched_tokens=64)  # small, so a batch of inputs spans several packed forwards
    return hf, llm


INPUTS = {
    "text": "A photograph of a cat sitting on a red sofa.",
    "image": {"messages": [user(img(1))]},
    "image_text": {"messages": [user(img(2, 84, 56), "What is in this image?")]},
    "token_ids": [9707, 11, 1879, 0, 42],
    "video": {"messages": CONVERSATIONS["video"]},
}


def reference(hf, llm: LLM, item) -> torch.Tensor:
    """transformers' last hidden state at the last token, for the ids our processor builds."""
    if isinstance(item, str):
        inputs = {"input_ids": torch.tensor(llm.processor.tokenizer.encode(item))}
    elif isinstance(item, list):
        inputs = {"input_ids": torch.tensor(item)}
    else:
        inputs = llm.processor(item["messages"], add_generation_prompt=True)
        end = llm.processor.tokenizer.token_to_id(END_TOKEN)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([end])])
    ids = inputs["input_ids"][None]
    vision = {k: v for k, v in inputs.items() if k != "input_ids" and v is not None}
    if vision:  # transformers 5 wants the token types whenever grids are given
        types = torch.zeros_like(ids)
        types[ids == llm.model.config.image_token_id] = 1
        types[ids == llm.model.config.video_token_id] = 2
        vision["mm_token_type_ids"] = types
    with torch.no_grad():
        out = hf.model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision)
    return out.last_hidden_state[0, -1].float()


@pytest.mark.parametrize("name", list(INPUTS))
def test_vector_equals_transformers_last_hidden_state(pair, name):
    hf, llm = pair
    want = reference(hf, llm, INPUTS[name])
    raw = llm.embed(INPUTS[name], normalize=False)
    assert raw.shape == (1, llm.model.config.text.hidden_size) and raw.dtype == torch.float32
    torch.testing.assert_close(raw[0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.embed(INPUTS[name])[0], F.normalize(want, dim=0), atol=1e-5, rtol=0)


def test_a_packed_batch_equals_each_input_alone_and_takes_no_cache_blocks(pair):
    hf, llm = pair
    items = list(INPUTS.values()) + ["short"]
    blocks = llm.engine.scheduler.blocks
    free = blocks.num_free_blocks
    batch = llm.embed(items, normalize=False)
    assert blocks.num_free_blocks == free and not llm.engine.has_work()
    for row, item in zip(batch, items):
        torch.testing.assert_close(row, reference(hf, llm, item), atol=1e-5, rtol=1e-5)


def test_dimensions_truncate_then_normalize(pair):
    _, llm = pair
    full = llm.embed("Matryoshka", normalize=False)
    cut = llm.embed("Matryoshka", dimensions=8)
    assert cut.shape == (1, 8)
    torch.testing.assert_close(cut, F.normalize(full[:, :8], dim=-1))
    assert torch.allclose(cut.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("bad, message", [
    ([], "no inputs"),
    ("", "empty string"),
    ([{"text": "x"}], "messages"),
    ([[1, 2, 10**7]], "outside the vocabulary"),
    ([list(range(5, 5 + 1025))], "max_model_len is 1024"),
])
def test_bad_inputs_are_value_errors_naming_the_problem(pair, bad, message):
    _, llm = pair
    with pytest.raises(ValueError, match=message):
        llm.embed(bad)


@pytest.mark.parametrize("dimensions", [0, 65, 2.5, True])
def test_dimensions_out_of_range_name_the_hidden_size(pair, dimensions):
    _, llm = pair
    with pytest.raises(ValueError, match="from 1 to 64"):
        llm.embed("x", dimensions=dimensions)


def _st_files(folder, mode_flag, normalize=True):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {k: k == mode_flag for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                          "pooling_mode_max_tokens", "pooling_mode_lasttoken")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))


@pytest.mark.parametrize("flag, normalize, want", [
    ("pooling_mode_lasttoken", True, Pooling("last", True)),
    ("pooling_mode_mean_tokens", False, Pooling("mean", False)),
    ("pooling_mode_cls_token", True, Pooling("first", True)),
    ("pooling_mode_max_tokens", True, Pooling("pooling_mode_max_tokens", True)),
])
def test_pooling_is_read_from_sentence_transformers_files(tmp_path, flag, normalize, want):
    assert read_pooling(tmp_path) == Pooling()  # no modules.json: last token, normalized
    _st_files(tmp_path, flag, normalize)
    got = read_pooling(tmp_path)
    assert (got.mode, got.normalize) == (want.mode, want.normalize)


def test_mean_pooling_from_the_checkpoint_files_and_an_unsupported_mode_is_named(pair, tmp_path):
    hf, llm = pair
    text = "mean of every token"
    ids = torch.tensor(llm.processor.tokenizer.encode(text))[None]
    with torch.no_grad():
        want = hf.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0)
    saved = llm.pooling
    try:
        llm.pooling = Pooling("mean", False)
        torch.testing.assert_close(llm.embed(text)[0], want, atol=1e-5, rtol=1e-5)
        llm.pooling = Pooling("pooling_mode_max_tokens", True)
        with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
            llm.embed(text)
    finally:
        llm.pooling = saved
