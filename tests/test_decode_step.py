"""The whole decode step in one C call (qwen2vl/backends/cpu/csrc/decode_step.c) against the Python path that
calls the same kernels one by one: the same values, bit for bit, in bf16 (AVX-512 BF16 dot products, or
fp32 FMAs on bf16 weights below that tier), int8, int4 and 8 bits in groups (GPTQ-Int8's), at every CPU tier
this machine can play where the linears are our kernels too (the `tier` fixture)."""

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.backends.cpu import decode_step, gemm, layer_ops
from qwen2vl.backends.cpu.decode_step import DecodeStep
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.tiers import tier_fixture

pytestmark = pytest.mark.skipif(not layer_ops.available() or decode_step.library() is None,
                                reason="the C kernels can't be built or run here")
tier = tier_fixture(lambda: layer_ops.available() and decode_step.library() is not None)


def skip_without_linear_kernels(text_model):
    """The whole step in C needs every decoder linear on one of our kernels (DecodeStep.build's rule):
    skip at a tier without them."""
    linears = [m for layer in text_model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    if any(decode_step._linear(m, []) is None for m in linears):
        pytest.skip("the linears aren't our kernels at this tier")


def tokens_and_logprobs(llm, prompts, max_tokens=20):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params)
    return [(o.token_ids, [(t.logprob, t.top) for t in o.logprobs]) for o in outs]


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_decode_step_in_c_equals_the_python_path_bit_for_bit(quantization, monkeypatch, tier):
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, quantization=quantization,
              enable_prefix_caching=False)
    skip_without_linear_kernels(llm.model.model)
    runner = llm.engine.runner
    assert isinstance(runner.decode_step, DecodeStep)
    if quantization is None:  # bf16 weights: AVX-512 BF16 dot products, else fp32 FMAs on the same packing
        kinds = {lin.kind for layer in runner.decode_step._layers for lin in (layer.qkv, layer.o, layer.down)}
        assert kinds == {decode_step.BF16 if gemm.bf16_library() is not None else decode_step.BF16W}
    assert_c_step_equals_python_path(llm, monkeypatch)


def assert_c_step_equals_python_path(llm, monkeypatch):
    runner = llm.engine.runner
    g = torch.Generator().manual_seed(1)
    # three sequences of different lengths decode together (M = 3 rows, blocks interleaved in the
    # cache), then one alone (M = 1) after the others finish
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 40, 23)]
    calls = []
    step = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, x, *a: calls.append(x.shape[0]) or step(self, x, *a))
    fast = tokens_and_logprobs(llm, prompts) + tokens_and_logprobs(llm, prompts[:1], 30)
    assert max(calls) == 3 and 1 in calls
    runner.decode_step = None  # the Python path: TextModel.forward on the C ops with the backend's paged_decode
    calls.clear()
    plain = tokens_and_logprobs(llm, prompts) + tokens_and_logprobs(llm, prompts[:1], 30)
    assert not calls
    assert fast == plain


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_decode_step_in_c_takes_a_quantized_batch_to_the_amx_tiles_as_the_python_path(quantization, monkeypatch,
                                                                                       tier):
    """gemm.AMX_CODES_ROWS[kind] rows and more decoding together: the C step calls the AMX tiles on the codes where
    they are on, as the Python linears do, so the two paths still agree bit for bit."""
    if gemm.amx_codes_library() is None:
        pytest.skip("the AMX tiles are not on at this tier")
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.05, quantization=quantization,
              enable_prefix_caching=False)
    skip_without_linear_kernels(llm.model.model)
    runner = llm.engine.runner
    kind = gemm.INT8 if quantization == "int8" else gemm.INT4
    assert runner.decode_step._layers[0].down.amx_rows == gemm.AMX_CODES_ROWS[kind]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 200, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 30, (gemm.AMX_CODES_ROWS[kind] + 3,), generator=g)]
    calls = []
    step = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, x, *a: calls.append(x.shape[0]) or step(self, x, *a))
    fast = tokens_and_logprobs(llm, prompts, 4)
    assert max(calls) == len(prompts)
    runner.decode_step = None
    assert fast == tokens_and_logprobs(llm, prompts, 4)


def test_decode_step_in_c_runs_gptq_int8_groups_as_the_python_path(tmp_path, monkeypatch, tier):
    """A GPTQ checkpoint of 8 bits in groups (Qwen's GPTQ-Int8 layout; groups of 32 here, the tiny model's
    widths being 64 and 96): every decoder linear is an INT8G kernel linear in the C step."""
    from qwen2vl import quantize_cli

    monkeypatch.setitem(quantize_cli.METHODS, "int8-g32", (8, 32))
    folder = tmp_path / "gptq8"
    quantize_cli.quantize_checkpoint(tiny_checkpoint(), folder, "int8-g32")
    llm = LLM(str(folder), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, enable_prefix_caching=False)
    skip_without_linear_kernels(llm.model.model)
    step = llm.engine.runner.decode_step
    assert isinstance(step, DecodeStep)
    kinds = {lin.kind for layer in step._layers for lin in (layer.qkv, layer.o, layer.gate, layer.up, layer.down)}
    assert kinds == {decode_step.INT8G}
    assert_c_step_equals_python_path(llm, monkeypatch)


def test_a_linear_off_our_kernels_keeps_the_python_path(tier):
    from qwen2vl.backends.cpu.linear import FastLinear

    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    text, cache = llm.model.model, llm.engine.runner.cache
    skip_without_linear_kernels(text)
    assert DecodeStep.build(text, cache) is not None
    mlp = text.layers[1].mlp
    mlp.down_proj = FastLinear(mlp.down_proj.dense_weight(), use_kernel=False)  # oneDNN
    assert mlp.down_proj.path != "bf16 kernel" and DecodeStep.build(text, cache) is None
