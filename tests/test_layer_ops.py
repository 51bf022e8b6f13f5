"""The C layer kernels (qwen2vl/backends/cpu/csrc/layer_ops.c) against the torch code they replace, and an LLM
using them (the CPU backend's TextKernels) against one that doesn't; at every CPU tier this machine can play
(the `tier` fixture), each tier's build against the same torch results."""

import subprocess

import pytest
import torch
import torch.nn.functional as F

from qwen2vl import LLM, Qwen2VL, SamplingParams
from qwen2vl.backends.cpu import layer_ops, native
from qwen2vl.backends.cpu.backend import CpuBackend
from qwen2vl.backends.kernel_ops import TextKernels
from qwen2vl.backends.paged_attention import PagedBatch, decode
from qwen2vl.backends.reference import TORCH_OPS
from qwen2vl.text import RMSNorm
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.layer_op_checks import assert_rotary_in_place_equals_apply_rotary
from tests.helpers.tiers import tier_fixture

pytestmark = pytest.mark.skipif(not layer_ops.available(), reason="layer kernels can't be built or run here")
tier = tier_fixture(layer_ops.available)
BF16 = torch.bfloat16


def randn(*shape, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


# 2048 x 1536: enough values that a sum of squares in another order than torch's shows (~20 differ)
@pytest.mark.parametrize("n, d", [(1, 1536), (2048, 1536), (5, 64), (3, 100), (4, 17), (2, 8), (2, 40000)])
def test_add_rms_norm_equals_residual_add_then_rmsnorm_bit_for_bit(n, d, tier):
    norm = RMSNorm(d, 1e-6).to(BF16)
    norm.weight.data = randn(d, seed=1)
    x, residual = randn(n, d, scale=3, seed=2), randn(n, d, scale=10, seed=3)
    x_before, residual_before = x.clone(), residual.clone()
    out, total = layer_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(total, residual + x)  # DecoderLayer's `x + sublayer(x)` in bf16
    assert torch.equal(out, norm(residual + x))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs left alone
    out, same = layer_ops.add_rms_norm(x, None, norm.weight, norm.eps)
    assert torch.equal(out, norm(x)) and same is x


@pytest.mark.parametrize("n, heads, kv_heads, dim", [(1, 12, 2, 128), (7, 4, 2, 16), (3, 3, 1, 40), (300, 12, 2, 128)])
def test_rotary_in_place_equals_apply_rotary_bit_for_bit(n, heads, kv_heads, dim, tier):
    assert_rotary_in_place_equals_apply_rotary(layer_ops.rotary_, n, heads, kv_heads, dim)


@pytest.mark.parametrize("n, i", [(1, 8960), (3, 100), (2, 7), (64, 1000)])
def test_silu_mul_matches_torch(n, i, tier):
    gate_up = randn(n, 2 * i, scale=4, seed=6)  # a fused gate|up output, read through strided views
    gate, up = gate_up.split(i, 1)
    want = F.silu(gate) * up
    for got in (layer_ops.silu_mul(gate, up), layer_ops.silu_mul(gate.contiguous(), up.contiguous())):
        # the kernel's exp is SLEEF's, as in torch's vectorized silu: measured equal, allow an ulp
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
        assert (got != want).float().mean() < 1e-3


def paged_case(lens, heads, kv_heads, dim, block_size=16, num_blocks=80, seed=0):
    """A random cache with each sequence in shuffled (non-consecutive) blocks, the new tokens' q/k/v as
    views of one qkv output, and the PagedBatch the runner would build for this decode step."""
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (randn(num_blocks, block_size, kv_heads, dim, seed=seed + i) for i in (1, 2))
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        tables.append(blocks[: -(-n // block_size)])
        blocks = blocks[len(tables[-1]):]
    width = max(len(t) for t in tables)
    ctx_slots = PagedBatch.context_slots(torch.tensor([t + [0] * (width - len(t)) for t in tables]), block_size,
                                         max(lens), torch.tensor(lens))
    slot_mapping = torch.stack([ctx_slots[b, n - 1] for b, n in enumerate(lens)])
    qkv = randn(len(lens), (heads + 2 * kv_heads) * dim, seed=seed + 3)
    q, k, v = qkv.view(len(lens), -1, dim).split([heads, kv_heads, kv_heads], 1)
    batch = PagedBatch(slot_mapping=slot_mapping, q_starts=list(range(len(lens))), q_lens=[1] * len(lens),
                       ctx_lens=list(lens), ctx_slots=ctx_slots, ctx_lens_t=torch.tensor(lens))
    return q, k, v, k_cache, v_cache, batch


@pytest.mark.parametrize("lens, heads, kv_heads, dim, threads", [
    ([300], 12, 2, 128, 2),
    ([1], 12, 2, 128, 2),
    ([5, 77, 300, 33], 12, 2, 128, 2),  # different lengths: the torch path masks, the kernel stops
    ([32, 33, 64, 65], 4, 2, 16, 1),  # around the kernel's key blocks of 32
    ([700], 3, 1, 40, 4),  # one (sequence, kv head) for 4 threads: the context split in 4, then merged
])
def test_paged_decode_writes_the_cache_and_matches_torch_decode(lens, heads, kv_heads, dim, threads, tier):
    q, k, v, k_cache, v_cache, batch = paged_case(lens, heads, kv_heads, dim)
    kernel_k, kernel_v = k_cache.clone(), v_cache.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = layer_ops.paged_decode(q, k, v, kernel_k, kernel_v, batch.slot_mapping, batch.ctx_slots,
                                     batch.ctx_lens_t)
    finally:
        torch.set_num_threads(before)
    for cache, new in ((k_cache, k), (v_cache, v)):  # KVCache.write
        cache.view(-1, kv_heads, dim).index_copy_(0, batch.slot_mapping, new)
    assert torch.equal(kernel_k, k_cache) and torch.equal(kernel_v, v_cache)
    # the kernel keeps fp32 to the end: within half a bf16 ulp of the exact result, and so within
    # an ulp of torch's SDPA (which rounds its probabilities to bf16)
    exact = decode(q.double(), k_cache.double(), v_cache.double(), batch)
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(got, decode(q, k_cache, v_cache, batch), rtol=2**-7, atol=2**-9)


def test_paged_decode_reads_only_the_slots_it_is_given():
    """The cache is allocated uninitialized: slots outside every context (here NaN) are never read."""
    lens = [5, 77, 300, 33]
    q, k, v, k_cache, v_cache, batch = paged_case(lens, 12, 2, 128)
    want = layer_ops.paged_decode(q, k, v, k_cache.clone(), v_cache.clone(), batch.slot_mapping, batch.ctx_slots,
                                  batch.ctx_lens_t)
    used = torch.cat([batch.ctx_slots[b, :n] for b, n in enumerate(lens)])
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, *cache.shape[2:])
        kept = flat[used].clone()
        flat.fill_(float("nan"))
        flat[used] = kept
    got = layer_ops.paged_decode(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.ctx_slots, batch.ctx_lens_t)
    assert torch.equal(got, want)


def test_without_the_kernels_the_model_keeps_the_torch_code(monkeypatch, caplog):
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
    native.library.cache_clear()
    try:
        def fail(source, flags):
            raise subprocess.CalledProcessError(1, ["cc"], stderr="no compiler today")

        monkeypatch.setattr(native, "build", fail)
        assert not layer_ops.available() and "compile failed" in caplog.text
        backend = CpuBackend()
        backend.prepare(model, None)
        assert model.model.ops is TORCH_OPS and not backend.fused_decode
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert layer_ops.available()
    # a float32 model is left alone too, and the kernels fed float32 leave it to the torch code
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    ids = torch.randint(0, 200, (9,), generator=torch.Generator().manual_seed(0))
    want = model.logits(ids)
    CpuBackend().prepare(model, None)
    assert model.model.ops is TORCH_OPS
    model.model.ops = TextKernels(layer_ops, layer_ops.supports)
    assert torch.equal(model.logits(ids), want)


def test_llm_with_layer_kernels_gives_the_same_tokens_as_without(monkeypatch, tier):
    fast = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    assert isinstance(fast.model.model.ops, TextKernels) and fast.model.backend.fused_decode
    # the per-op Python path (the whole step in C equals it bit for bit: tests/test_decode_step.py)
    fast.engine.runner.decode_step = None
    plain = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    plain.model.model.ops, plain.model.backend.fused_decode, plain.engine.runner.decode_step = TORCH_OPS, False, None

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (5, 40, 23)]
    # a whole-sequence forward (prefill) is the same bit for bit: every kernel but attention is exact
    assert torch.equal(fast.model.logits(torch.tensor(prompts[1])), plain.model.logits(torch.tensor(prompts[1])))

    calls = []
    kernel = layer_ops.paged_decode
    monkeypatch.setattr(layer_ops, "paged_decode", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    got, want = fast.generate(prompts, params), plain.generate(prompts, params)
    assert max(calls) == 3  # three sequences decoded together, blocks interleaved in the cache
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        lp_a, lp_b = [t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs]
        # attention agrees within a bf16 rounding, so a logit may land one bf16 ulp away: 1/32 at the
        # tiny model's |logits| of 4-8 (seen under ATEN_CPU_CAPABILITY=avx2, whose F.linear rounds more)
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_b), rtol=0, atol=0.04)
