"""The whole decode step in one C call (qwen2vl/backends/cpu/csrc/decode_step.c) against the Python path that
calls the same kernels one by one: the same values, bit for bit, in bf16 (AVX-512 BF16 kernel or fp32
arithmetic), int8 and int4."""

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.backends.cpu import decode_step, gemm, layer_ops
from qwen2vl.backends.cpu.decode_step import DecodeStep
from tests.test_server_support import tiny_checkpoint

pytestmark = pytest.mark.skipif(not layer_ops.available() or decode_step.library() is None,
                                reason="the C kernels can't be built or run here")


def tokens_and_logprobs(llm, prompts, max_tokens=20):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params)
    return [(o.token_ids, [(t.logprob, t.top) for t in o.logprobs]) for o in outs]


def on_bf16w(llm, monkeypatch):
    """Every decoder FastLinear of `llm` moved onto bf16w_gemm (path "bf16w kernel"), as FastLinear will
    be on CPUs without AVX-512 BF16, and the runner's decode step rebuilt over them."""
    from qwen2vl.linear import FastLinear

    forward = FastLinear.forward

    def bf16w_forward(self, x):
        if self.path != "bf16w kernel":
            return forward(self, x)
        y = gemm.bf16w_gemm(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    monkeypatch.setattr(FastLinear, "forward", bf16w_forward)
    for layer in llm.model.model.layers:
        for owner, name in [(layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_proj"),
                            (layer.mlp, "up_proj"), (layer.mlp, "down_proj")]:
            fast = getattr(owner, name)
            moved = FastLinear(fast.dense_weight(), fast.bias, use_kernel=False)
            moved.packed, moved.path, moved.weight = gemm.pack_bf16(fast.dense_weight()), "bf16w kernel", None
            setattr(owner, name, moved)
    runner = llm.engine.runner
    runner.decode_step = DecodeStep.build(llm.model.model, runner.cache)
    kinds = {lin.kind for layer in runner.decode_step._layers for lin in (layer.qkv, layer.o, layer.down)}
    assert kinds == {decode_step.BF16W}


@pytest.mark.parametrize("quantization", [None, "int8", "int4", "bf16w"])
def test_decode_step_in_c_equals_the_python_path_bit_for_bit(quantization, monkeypatch):
    if quantization == "bf16w" and gemm.bf16w_library() is None:
        pytest.skip("no bf16w_gemm here")
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02,
              quantization=None if quantization == "bf16w" else quantization, enable_prefix_caching=False)
    runner = llm.engine.runner
    if quantization == "bf16w":
        on_bf16w(llm, monkeypatch)
    assert isinstance(runner.decode_step, DecodeStep)
    g = torch.Generator().manual_seed(1)
    # three sequences of different lengths decode together (M = 3 rows, blocks interleaved in the
    # cache), then one alone (M = 1) after the others finish
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 40, 23)]
    calls = []
    step = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, x, *a: calls.append(x.shape[0]) or step(self, x, *a))
    fast = tokens_and_logprobs(llm, prompts) + tokens_and_logprobs(llm, prompts[:1], 30)
    assert max(calls) == 3 and 1 in calls
    runner.decode_step = None  # the Python path: FastTextModel.forward with the runner's paged_decode
    calls.clear()
    plain = tokens_and_logprobs(llm, prompts) + tokens_and_logprobs(llm, prompts[:1], 30)
    assert not calls
    assert fast == plain


def test_a_linear_off_our_kernels_keeps_the_python_path():
    from qwen2vl.linear import FastLinear

    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    text, cache = llm.model.model, llm.engine.runner.cache
    assert DecodeStep.build(text, cache) is not None
    mlp = text.layers[1].mlp
    mlp.down_proj = FastLinear(mlp.down_proj.dense_weight(), use_kernel=False)  # oneDNN
    assert mlp.down_proj.path != "bf16 kernel" and DecodeStep.build(text, cache) is None
