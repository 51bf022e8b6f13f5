"""LoRA with trainable tokens (`qwen2vl train --train-tokens IDS` without --full; PEFT's
`trainable_token_indices`), in float32 on tiny checkpoints with tied and untied heads: a training step's
loss and gradients are PEFT's; the adapter we write loads in PEFT and gives our logits, served and in
training; merged equals unmerged, and --tokens-only merges the rows alone; a batch mixing it with another
adapter and the base model equals each run alone; adapters we cannot apply are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl.adapter import CONFIG, WEIGHTS, TokenWeights, peft_key, read_adapter, write_adapter
from qwen2vl.cli import main
from qwen2vl.engine.llm import LLM
from qwen2vl.loader import canonical_name
from qwen2vl.processing.processor import Processor
from qwen2vl.processing.tokenizer import Tokenizer
from qwen2vl.token_rows import attached_token_rows
from qwen2vl.train.data import read_rows
from qwen2vl.train.loop import TrainConfig, train
from qwen2vl.train.lora import lora_modules, save_lora
from qwen2vl.train.merge import merge
from qwen2vl.train.setup import load_for_training
from tests.helpers.training import (
    hf_step,
    model_folder,
    our_step,
    random_adapter,
    sample_rows,
    write_image,
    write_jsonl,
)
from tests.test_lora_serving import batch_equals_each_alone, conversation, hf_logits, our_logits, training_logits

TARGETS = ["q_proj", "v_proj", "down_proj"]
DELTA = "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("lora_tokens")
    hf = model_folder(root / "base", tie=request.param)
    data = write_jsonl(root / "data.jsonl", sample_rows(root))
    write_image(root / "cat.png", 3)
    tok = Tokenizer.from_pretrained(root / "base")
    answers = sorted({i for text in ("A noisy square.", "Yes.") for i in tok.encode(text)})
    ids = answers[:3] + [7, 151000]  # tokens the answers hold, and two they do not
    return root, hf, data, ids


def weights(folder) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by our names."""
    return {canonical_name(k): t for k, t in load_file(str(folder / "model.safetensors")).items()}


def trained_model(root, ids, seed=0):
    """Our training model with LoRA and token rows, moved off their start as if trained."""
    torch.manual_seed(seed)
    model = load_for_training(root / "base", dtype=torch.float32, device="cpu", full=False, train_vision=False,
                              lora=dict(targets=TARGETS, rank=4, alpha=8.0, dropout=0.0), train_tokens=ids)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
        attached_token_rows(model).rows.add_(torch.randn(len(ids), model.config.text.hidden_size) * 0.5)
    return model


def peft_model(hf, model, ids):
    """PEFT's model of the same adapter (A, B and rows copied from ours)."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                         trainable_token_indices=sorted(ids)))  # our rows' order
    theirs = dict(peft.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for which in "AB":
                theirs[peft_key(name, which).replace(f".lora_{which}.", f".lora_{which}.default.")].copy_(
                    getattr(m, f"lora_{which}"))
        theirs[DELTA + ".default"].copy_(attached_token_rows(model).rows)
    return peft, theirs


def test_a_training_step_matches_peft(setup):
    root, hf, data, ids = setup
    model = trained_model(root, ids)
    processor = Processor.from_pretrained(root / "base")
    loss, _ = our_step(model, processor, read_rows(data))
    peft, theirs = peft_model(hf, model, ids)
    try:
        peft.train()
        want = hf_step(peft, processor, read_rows(data), model.config)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        ours = attached_token_rows(model).rows.grad
        answers = [sorted(ids).index(i) for i in ids[:3]]  # rows are in token order
        assert ours is not None and ours[answers].abs().sum(dim=1).min() > 0  # the answers' tokens have gradients
        torch.testing.assert_close(ours, theirs[DELTA + ".default"].grad, rtol=1e-4, atol=1e-6)
        for name, m in lora_modules(model).items():
            key = peft_key(name, "A").replace(".lora_A.", ".lora_A.default.")
            torch.testing.assert_close(m.lora_A.grad, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    finally:
        peft.unload()
    assert not [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n
                and not n.endswith("token_rows.rows")]


def test_peft_loads_our_adapter_and_gives_our_logits(setup):
    from peft import PeftModel

    root, hf, _, ids = setup
    model = trained_model(root, ids)
    folder = save_lora(model, root / "adapter", TARGETS, 0.0, str(root / "base"))
    assert json.loads((folder / CONFIG).read_text())["trainable_token_indices"] == sorted(ids)
    assert load_file(str(folder / WEIGHTS))[DELTA].shape == (len(ids), model.config.text.hidden_size)
    text = "Yes. A noisy square."  # its tokens are among the trained ones
    inputs = Processor.from_pretrained(root / "base")(conversation(root, text), add_generation_prompt=True)
    peft = PeftModel.from_pretrained(hf, str(folder)).eval()
    try:
        theirs = hf_logits(peft, inputs)
    finally:
        peft.unload()
    base = our_logits(root / "base", None, inputs)
    served = our_logits(root / "base", folder, inputs)
    assert (served - base).abs().max() > 1e-2
    torch.testing.assert_close(served, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(training_logits(model.eval(), inputs), theirs, rtol=1e-4, atol=1e-4)
    # the rows alone (no LoRA) change the logits too: the embedding, and a tied head's columns
    rows_only = root / "rows_only"
    rows_only.mkdir(exist_ok=True)
    config = json.loads((folder / CONFIG).read_text())
    (rows_only / CONFIG).write_text(json.dumps({**config, "target_modules": []}))
    save_file({DELTA: load_file(str(folder / WEIGHTS))[DELTA]}, str(rows_only / WEIGHTS))
    assert (our_logits(root / "base", rows_only, inputs) - base).abs().max() > 1e-2


def test_a_trainable_tokens_adapter_peft_writes_gives_peft_logits(setup):
    """PEFT's TRAINABLE_TOKENS adapter (the rows alone; a tied head's copy saved beside them) served as PEFT runs it."""
    from peft import PeftModel, TrainableTokensConfig, get_peft_model

    root, hf, _, ids = setup
    peft = get_peft_model(hf, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=ids))
    try:
        with torch.no_grad():
            next(p for n, p in peft.named_parameters() if "trainable_tokens_delta" in n).normal_(0, 0.5)
        peft.save_pretrained(root / "tt")
    finally:
        peft.unload()
    text = "Yes. A noisy square."
    inputs = Processor.from_pretrained(root / "base")(conversation(root, text), add_generation_prompt=True)
    peft = PeftModel.from_pretrained(hf, str(root / "tt")).eval()
    try:
        theirs = hf_logits(peft, inputs)
    finally:
        peft.unload()
    assert read_adapter(root / "tt").modules == {} and read_adapter(root / "tt").tokens.ids == ids
    assert (theirs - our_logits(root / "base", None, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(our_logits(root / "base", root / "tt", inputs), theirs, rtol=1e-4, atol=1e-4)


def test_merged_checkpoint_gives_the_unmerged_logits(setup):
    root, _, _, ids = setup
    folder = save_lora(trained_model(root, ids, seed=1), root / "adapter1", TARGETS, 0.0, None)
    inputs = Processor.from_pretrained(root / "base")(conversation(root, "Yes."), add_generation_prompt=True)
    merged = merge(root / "base", folder, root / "merged")
    torch.testing.assert_close(our_logits(merged, None, inputs), our_logits(root / "base", folder, inputs),
                               rtol=1e-4, atol=1e-4)
    rows = merge(root / "base", folder, root / "rows", tokens_only=True)
    base, got = weights(root / "base"), weights(rows)
    adapter = read_adapter(folder)
    for name in base:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(base[name], got[name]), name
    others = torch.ones(base["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    others[adapter.tokens.ids] = False
    assert torch.equal(got["model.embed_tokens.weight"][adapter.tokens.ids], adapter.tokens.rows)
    assert torch.equal(got["model.embed_tokens.weight"][others], base["model.embed_tokens.weight"][others])
    if "lm_head.weight" in base:  # untied: the head keeps its own rows
        assert torch.equal(base["lm_head.weight"], got["lm_head.weight"])
    plain = random_adapter(root / "plain", root / "base", TARGETS, rank=4, alpha=8.0, seed=3)
    with pytest.raises(ValueError, match="holds no token rows"):
        merge(root / "base", plain, root / "bad", tokens_only=True)


def test_mixed_batch_with_token_rows_equals_each_run_alone(setup):
    root, _, _, ids = setup
    folder = save_lora(trained_model(root, ids, seed=2), root / "adapter2", TARGETS, 0.0, None)
    other = random_adapter(root / "other", root / "base", TARGETS, rank=4, alpha=8.0, seed=4)
    llm = LLM(str(root / "base"), lora={"t": folder, "o": other}, dtype="float32", kv_cache_gib=0.02, block_size=4)
    prompts = [llm.prompt(conversation(root, "Yes. A noisy square.")), llm.prompt(conversation(root))]
    batch = batch_equals_each_alone(llm, prompts, [None, "t", "o", "t", None, "o"])
    assert len({tuple(o.token_ids) for o in batch[:3]}) == 3  # the base, the rows' adapter and the other differ


def test_the_command_trains_and_checkpoints_the_rows(setup, capsys):
    root, _, data, ids = setup
    args = ["train", "--model", str(root / "base"), "--data", str(data), "--output", str(root / "run"),
            "--train-tokens", ",".join(map(str, ids)), "--lora-targets", ",".join(TARGETS), "--lora-rank", "4",
            "--dtype", "fp32", "--lr", "1e-3", "--token-lr", "1e-2", "--batch-size", "2", "--steps", "3",
            "--save-every", "2", "--overwrite"]
    assert main(args) == 0
    adapter = read_adapter(root / "run")
    start = weights(root / "base")["model.embed_tokens.weight"]
    moved = (adapter.tokens.rows != start[adapter.tokens.ids]).any(dim=1)
    assert adapter.tokens.ids == sorted(ids) and moved[[sorted(ids).index(i) for i in ids[:3]]].all()
    assert read_adapter(root / "run" / "checkpoint-2").tokens.ids == sorted(ids)
    assert main([*args[:-1], "--resume"]) == 0  # from checkpoint-2: the same rows as the uninterrupted run
    torch.testing.assert_close(read_adapter(root / "run").tokens.rows, adapter.tokens.rows, rtol=0, atol=1e-6)
    assert main(["merge", str(root / "base"), str(root / "run"), str(root / "taught"), "--tokens-only"]) == 0
    assert torch.equal(weights(root / "taught")["model.embed_tokens.weight"][adapter.tokens.ids], adapter.tokens.rows)
    capsys.readouterr()
    assert main(args[:7] + ["--token-lr", "1e-2", "--steps", "1", "--overwrite"]) == 1  # no --train-tokens
    assert "--token-lr needs --train-tokens" in capsys.readouterr().err


def test_token_lr_is_the_rows_rate(setup):
    """Adam's first step moves each weight by its rate (the gradient's sign): rows by --token-lr, B by --lr."""
    root, _, data, ids = setup
    out = train(TrainConfig(model=str(root / "base"), data=str(data), output=str(root / "one"), train_tokens=ids,
                            lora_targets=TARGETS, lora_rank=4, dtype="fp32", lr=1e-3, token_lr=1e-2, batch_size=2,
                            steps=1, overwrite=True), log=lambda _: None)
    adapter = read_adapter(out)
    start = weights(root / "base")["model.embed_tokens.weight"][adapter.tokens.ids]
    torch.testing.assert_close((adapter.tokens.rows - start).abs().max().item(), 1e-2, rtol=1e-3, atol=0)
    b = max(m.B.abs().max().item() for m in adapter.modules.values())
    torch.testing.assert_close(b, 1e-3, rtol=1e-3, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"trainable_token_indices": {"lm_head": [3, 7]}}, "only the embedding's tokens are supported"),
    ({"trainable_token_indices": [3, 3]}, r"2 trainable token ids \(distinct: 1\)"),
    ({"trainable_token_indices": ["3", 7]}, "must list token ids"),
])
def test_adapters_we_cannot_apply_are_refused(setup, tmp_path, change, message):
    root, _, _, _ = setup
    folder = random_adapter(tmp_path / "a", root / "base", TARGETS, rank=4, alpha=8.0, seed=5)
    tensors = load_file(str(folder / WEIGHTS))
    tensors[DELTA] = torch.zeros(2, 64)
    save_file(tensors, str(folder / WEIGHTS))
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        read_adapter(folder)


def test_an_adapter_of_rows_alone_keeps_the_c_decode_step(setup):
    """No LoRA linears: the CPU's fused decode step stays on, the rows applied around it (embedding, head)."""
    root, _, _, ids = setup
    rows = torch.randn(len(ids), 64, generator=torch.Generator().manual_seed(7))
    folder = write_adapter(root / "rows_bf16", {}, rank=4, alpha=8.0, dropout=0.0, targets=[], base=None,
                           tokens=TokenWeights(ids, rows))
    llm = LLM(str(root / "base"), lora={"r": folder}, dtype="bfloat16", kv_cache_gib=0.02, block_size=4)
    if llm.engine.runner.backend.decode_step(llm.engine.runner.model, llm.engine.cache) is None:
        pytest.skip("this CPU tier has no fused decode step")
    assert llm.engine.runner.decode_step is not None
    prompts = [llm.prompt(conversation(root, "Yes. A noisy square.")), llm.prompt(conversation(root))]
    batch = batch_equals_each_alone(llm, prompts, [None, "r", "r", None], atol=2e-2)
    assert batch[0].token_ids != batch[2].token_ids or batch[1].token_ids != batch[3].token_ids


@pytest.mark.parametrize("ids, width, message", [([3, 200000], 64, r"token ids \[200000\] are outside"),
                                                 ([3, 7], 32, "token rows 32 wide, this model's embedding 64")])
def test_rows_for_another_model_are_refused_by_serving_and_merge(setup, tmp_path, ids, width, message):
    root, _, _, _ = setup
    folder = write_adapter(tmp_path / "a", {}, rank=4, alpha=8.0, dropout=0.0, targets=[], base=None,
                           tokens=TokenWeights(ids, torch.zeros(len(ids), width)))
    with pytest.raises(ValueError, match=message):
        LLM(str(root / "base"), lora={"x": folder}, dtype="float32", kv_cache_gib=0.02)
    with pytest.raises(ValueError, match=message):
        merge(root / "base", folder, tmp_path / "merged")
