"""`matmul="int8"` (Isa.matmul_dtype's knob): the vision tower and the decoder's many-row calls run
int8_mm on codes quantized at load, decode rows keep the linear they had, and answers stay close to
the model's own; at every tier this machine can play (none: the knob changes nothing)."""

from __future__ import annotations

import pytest
import torch

from qwen2vl import LLM, Qwen2VL, SamplingParams
from qwen2vl.backends import backend_for, prepare
from qwen2vl.backends.cpu import decode_step, int8_mm
from qwen2vl.backends.cpu.int8_mm import SMALL_ROWS, Int8RowsLinear
from qwen2vl.backends.cpu.linear import FastLinear
from qwen2vl.backends.quant import Int8Linear
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.tiers import TIERS_HERE, at_tier


def load(dtype=torch.bfloat16) -> Qwen2VL:
    return Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("tier", TIERS_HERE)
def test_matmul_int8_runs_the_tower_and_prefill_in_int8_close_to_the_model(tier):
    plain = load()
    ids = torch.randint(0, 200, (17,), generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, plain.config.vision.patch_dim, generator=torch.Generator().manual_seed(1))
    with at_tier(tier) as here, torch.no_grad():
        model = load()
        prepare(model, None, "int8")
        qkv, patch = model.model.layers[0].self_attn.qkv_proj, model.visual.patch_embed.proj
        if here.tier == "none" or int8_mm.library() is None:  # no kernel: the dtype's policy, as without the knob
            assert not isinstance(qkv, Int8RowsLinear) and not isinstance(patch, Int8RowsLinear)
            return
        assert isinstance(qkv, Int8RowsLinear) and isinstance(qkv.small, FastLinear)
        assert isinstance(patch, Int8RowsLinear) and patch.small is None
        assert isinstance(model.visual.blocks[0].mlp.fc1, Int8RowsLinear)
        assert isinstance(model.lm_head, FastLinear)  # one row per sequence at prefill: not int8
        logits, vision = model.logits(ids), model.visual(pixels, grid)
        ref_logits, ref_vision = plain.logits(ids), plain.visual(pixels, grid)
    # int8 weights per channel and activations per token: a few % of the outputs' size on random weights
    assert rel_err(vision, ref_vision) < 0.05
    assert rel_err(logits, ref_logits) < 0.05
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.8


def test_decode_rows_run_the_linear_beside_and_many_rows_int8_mm():
    if int8_mm.library() is None:
        pytest.skip("no int8_mm kernel here")
    model = load()
    prepare(model, None, "int8")
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(SMALL_ROWS + 5, lin.in_features).to(torch.bfloat16)
    with torch.no_grad():
        few, many = lin(x[:SMALL_ROWS]), lin(x)
        assert torch.equal(few, lin.small(x[:SMALL_ROWS]))
        assert torch.equal(many, int8_mm.int8_mm(x, lin.weight, lin.scales, lin.bias, lin.out_features))
    # the C decode step describes the linear beside the codes, so it stays on
    assert decode_step._linear(lin, []) is not None


def test_an_int8_model_shares_its_codes():
    if int8_mm.library() is None:
        pytest.skip("no int8_mm kernel here")
    model = load()
    prepare(model, "int8", "int8")
    lin = model.model.layers[0].mlp.gate_proj
    assert isinstance(lin, Int8RowsLinear) and isinstance(lin.small, Int8Linear)
    assert lin.weight.data_ptr() == lin.small.weight.data_ptr()


def test_float32_model_keeps_float32_decode_rows():
    if int8_mm.library() is None:
        pytest.skip("no int8_mm kernel here")
    model = load(torch.float32)
    prepare(model, None, "int8")
    lin = model.model.layers[1].self_attn.o_proj
    assert isinstance(lin, Int8RowsLinear) and type(lin.small) is torch.nn.Linear


def test_llm_with_matmul_int8_answers():
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, matmul="int8")
    out = llm.chat([{"role": "user", "content": "Hello there, how are you today?"}],
                   SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) >= 1


def test_bad_matmul_values_are_refused():
    with pytest.raises(ValueError, match="matmul must be None or one of int8"):
        LLM(str(tiny_checkpoint()), matmul="int4")
    with pytest.raises(ValueError, match="matmul must be None or one of int8"):
        prepare(load(), None, "fp8")
    with pytest.raises(ValueError, match="CPU policy"):
        backend_for(torch.device("cuda"), "int8")


def test_the_knob_fuses_prefill_attention_only_where_it_is_in_effect(monkeypatch):
    import qwen2vl.backends.reference as reference
    from tests.helpers.paged_cache import build

    seen = []
    real = reference.paged_attention
    monkeypatch.setattr(reference, "paged_attention", lambda *a: seen.append(a[6]) or real(*a))  # a[6]: fused
    for tier in TIERS_HERE:
        with at_tier(tier):
            model = load()
            prepare(model, None, "int8")
            q, k, v, cache, batch, want = build([0, 3], [5, 4])
            torch.testing.assert_close(model.backend.attention(q, k, v, *cache.layers[0], batch), want)
            assert seen.pop() == model.backend.fused_prefill and not seen
            # fused too where bf16 matmuls would be emulated (on float32 copies then: test_engine_attention.py)
            emulated = not model.backend.isa.native_bf16_matmul
            assert model.backend.fused_prefill == (emulated or (tier != "none" and int8_mm.library() is not None))
