"""LoRA adapters at inference, in float32 on a tiny checkpoint: PEFT loads the adapters we write and gives
our logits; a merged checkpoint gives the unmerged logits; requests with different adapters (and none)
batched in one engine step equal each run alone; the LoRA linear wraps every kind of base linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qwen2vl.adapter import read_adapter
from qwen2vl.attention import causal_attend
from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.lora import LoRARows, MultiLoRALinear, attach_adapters
from qwen2vl.model import Qwen2VL
from qwen2vl.positions import mrope_positions
from qwen2vl.processing.processor import Processor
from qwen2vl.train.lora import lora_modules, save_lora
from qwen2vl.train.merge import merge
from qwen2vl.train.setup import load_for_training
from tests.helpers.training import model_folder, random_adapter, write_image

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_serving")
    hf = model_folder(root / "base")
    random_adapter(root / "a", root / "base", ALL, rank=4, alpha=8, seed=1)
    random_adapter(root / "b", root / "base", ["q_proj", "v_proj", "down_proj"], rank=8, alpha=4, seed=2)
    write_image(root / "cat.png", 3)
    inputs = Processor.from_pretrained(root / "base")(conversation(root), add_generation_prompt=True)
    return root, hf, inputs


def conversation(root, question="What is it?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(root / "cat.png")},
                                         {"type": "text", "text": question}]}]


def our_logits(folder, adapter, inputs) -> torch.Tensor:
    """Qwen2VL.logits with `adapter` (or none) on every row: the serving LoRA linears."""
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        attach_adapters(model, {"x": read_adapter(adapter)}).set([1], [inputs["input_ids"].numel()], "cpu")
    return model.logits(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                        image_grid_thw=inputs["image_grid_thw"])


@torch.no_grad()
def training_logits(model, inputs) -> torch.Tensor:
    """The training model's forward (LoRALinear, dropout off) on one sequence."""
    ids = inputs["input_ids"]
    positions, _ = mrope_positions(ids, inputs["image_grid_thw"], None, model.config)
    vision = model.encode_vision(ids, inputs["pixel_values"], inputs["image_grid_thw"], None, None)
    return model.compute_logits(model.model(model.embed(ids, vision), positions, causal_attend))


def hf_logits(model, inputs) -> torch.Tensor:
    ids = inputs["input_ids"][None]
    types = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=types).logits[0]


def test_peft_loads_the_adapter_training_writes_and_gives_our_logits(setup):
    from peft import PeftModel

    root, hf, inputs = setup
    torch.manual_seed(0)
    model = load_for_training(root / "base", dtype=torch.float32, device="cpu", full=False, train_vision=False,
                              lora=dict(targets=ALL, rank=4, alpha=8.0, dropout=0.1))
    with torch.no_grad():  # as if trained: B away from its zero init
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.2)
    save_lora(model, root / "trained", ALL, 0.1, str(root / "base"))
    peft = PeftModel.from_pretrained(hf, str(root / "trained")).eval()
    try:
        theirs = hf_logits(peft, inputs)
    finally:
        peft.unload()  # hand the module-scoped transformers model back unchanged
    assert (theirs - our_logits(root / "base", None, inputs)).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(our_logits(root / "base", root / "trained", inputs), theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(training_logits(model.eval(), inputs), theirs, rtol=1e-4, atol=1e-4)


def test_merged_checkpoint_gives_the_unmerged_logits(setup):
    root, _, inputs = setup
    out = merge(root / "base", root / "b", root / "merged")
    unmerged = our_logits(root / "base", root / "b", inputs)
    assert (unmerged - our_logits(root / "base", None, inputs)).abs().max() > 1e-2
    torch.testing.assert_close(our_logits(out, None, inputs), unmerged, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (root / "base").iterdir())


def test_adapters_on_fused_qkv_and_gate_up_linears(setup):
    """The engine fuses q|k|v (and gate|up on CUDA) before adapters attach: each part gets its own."""
    root, _, inputs = setup
    adapters = {"a": read_adapter(root / "a"), "b": read_adapter(root / "b")}
    n = inputs["input_ids"].numel()
    model = Qwen2VL.from_pretrained(root / "base", dtype=torch.float32)
    model.fuse_qkv()
    model.fuse_gate_up()
    rows = attach_adapters(model, adapters)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, MultiLoRALinear)
    for slot, name in ((1, root / "a"), (2, root / "b")):
        rows.set([slot], [n], "cpu")
        got = model.logits(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"])
        torch.testing.assert_close(got, our_logits(root / "base", name, inputs), rtol=1e-4, atol=1e-4)


def batch_equals_each_alone(llm, prompts, names: list[str | None], atol: float = 1e-4) -> list:
    """Generate prompts[i % 2] with adapter names[i], all in one batch, then each alone, one after another
    (the prefix cache then holds the same prompt under other adapters): the same tokens and logprobs
    (within `atol`: bf16 kernels may round a batch's rows otherwise than a row alone)."""
    batch = llm.generate([prompts[i % 2] for i in range(len(names))], GREEDY, lora=names)
    alone = [llm.generate(prompts[i % 2], GREEDY, lora=name)[0] for i, name in enumerate(names)]
    for together, single in zip(batch, alone):
        assert together.token_ids == single.token_ids
        torch.testing.assert_close([lp.logprob for lp in together.outputs[0].logprobs],
                                   [lp.logprob for lp in single.outputs[0].logprobs], rtol=0, atol=atol)
    return batch


def test_mixed_adapter_batch_equals_each_run_alone(setup):
    root, _, _ = setup
    llm = LLM(str(root / "base"), lora={"a": root / "a", "b": root / "b"}, dtype="float32", kv_cache_gib=0.02,
              block_size=4)
    prompts = [llm.prompt(conversation(root)), llm.prompt(conversation(root, "And the colours?"))]
    batch = batch_equals_each_alone(llm, prompts, [None, "a", "b", "a", None, "b"])
    assert len({tuple(o.token_ids) for o in batch[:3]}) == 3  # base, a and b answer differently
    assert llm.engine.stats().prefix_cache_hits > 0  # the cache was used, within each adapter
    with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
        llm.generate(prompts[0], GREEDY, lora="c")


def test_one_adapter_for_every_request_and_no_c_decode_step(setup):
    root, _, _ = setup
    llm = LLM(str(root / "base"), lora=root / "a", dtype="bfloat16", kv_cache_gib=0.02)
    assert llm.engine.runner.decode_step is None  # the LoRA linears are not the C step's kernels
    plain = LLM(str(root / "base"), dtype="bfloat16", kv_cache_gib=0.02)
    assert plain.engine.runner.decode_step is not None or not plain.model.backend.fused_decode  # (where C runs)
    default = llm.chat(conversation(root), GREEDY)[0]
    assert default.token_ids == llm.chat(conversation(root), GREEDY, lora="a")[0].token_ids


def _int8(linear: nn.Linear):
    from qwen2vl.backends.quant import quantize_model

    holder = nn.Module()
    holder.proj = linear
    quantize_model(holder, "int8", 32)
    return holder.proj


@pytest.mark.parametrize("kind", ["linear", "fast", "int8"])
def test_lora_linear_wraps_any_base_linear(kind):
    from qwen2vl.backends.cpu.linear import FastLinear

    torch.manual_seed(0)
    dtype = torch.float32 if kind == "linear" else torch.bfloat16
    linear = nn.Linear(64, 96, bias=True).to(dtype)
    base = {"linear": lambda m: m, "fast": FastLinear.from_linear, "int8": _int8}[kind](linear)
    # two adapters, the second on only the last third of the outputs (as k of a fused q|k|v)
    a1, b1, a2, b2 = torch.randn(4, 64), torch.randn(96, 4), torch.randn(2, 64), torch.randn(32, 2)
    A = torch.cat([a1, a2]).to(dtype)
    B = torch.zeros(96, 6, dtype=dtype)
    B[:, :4], B[64:, 4:] = b1.to(dtype), b2.to(dtype)
    scales = torch.tensor([[0] * 6, [0.5] * 4 + [0] * 2, [0] * 4 + [2.0] * 2], dtype=dtype)
    rows = LoRARows(["one", "two"])
    wrapped = MultiLoRALinear(base, A, B, scales, rows)
    x = torch.randn(5, 64).to(dtype)
    rows.set([0, 1, 2], [1, 2, 2], "cpu")
    got = wrapped(x).float()
    plain = base(x).float()
    want = plain.clone()
    xf = x.float()
    want[1:3] += 0.5 * (xf[1:3] @ a1.T @ b1.T)
    want[3:5, 64:] += 2.0 * (xf[3:5] @ a2.T @ b2.T)
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)  # slot 0: the base, untouched


def test_server_serves_adapters_as_models(tmp_path):
    from openai import NotFoundError, OpenAI

    from qwen2vl.server.limits import ServerLimits
    from tests.helpers.checkpoints import tiny_checkpoint
    from tests.helpers.server import running_server

    adapter = random_adapter(tmp_path / "forms", tiny_checkpoint(), ALL, rank=4, alpha=8, seed=5)
    messages = [{"role": "user", "content": "Tell me a story."}]
    with running_server(ServerLimits(), api_key=None, lora={"forms": adapter}) as (url, app):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        cards = client.models.list().data
        assert [m.id for m in cards] == ["tiny", "forms"] and cards[1].model_extra["parent"] == "tiny"
        answers = {}
        for model in ("tiny", "forms"):
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
            assert r.model == model
            answers[model] = r.choices[0].message.content
        with pytest.raises(NotFoundError, match="serves 'tiny', 'forms'"):
            client.chat.completions.create(model="other", messages=messages, max_tokens=2)
        llm = app.state.service.engine.llm
    params = SamplingParams(temperature=0, max_tokens=6)
    assert answers["forms"] != answers["tiny"]
    assert answers["forms"] == llm.processor.decode(llm.chat(messages, params, lora="forms")[0].token_ids)
    assert answers["tiny"] == llm.processor.decode(llm.chat(messages, params)[0].token_ids)


def test_serve_lora_arguments_are_checked_before_loading(tmp_path):
    from qwen2vl.server.cli import parse_lora_arguments
    from tests.helpers.checkpoints import tiny_checkpoint

    random_adapter(tmp_path / "a", tiny_checkpoint(), ["q_proj"], rank=2, alpha=2, seed=0)
    assert parse_lora_arguments([f"a={tmp_path / 'a'}"], "base") == {"a": str(tmp_path / "a")}
    for values, message in [(["a"], "expected NAME=DIR"), ([f"={tmp_path}"], "expected NAME=DIR"),
                            ([f"base={tmp_path / 'a'}"], "already taken"),
                            ([f"a={tmp_path / 'a'}", f"a={tmp_path / 'a'}"], "already taken"),
                            ([f"b={tmp_path}"], "has no adapter_config.json")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            parse_lora_arguments(values, "base")

