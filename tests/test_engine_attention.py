"""Paged attention against plain causal attention over each sequence's whole k/v."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen2vl.backends.paged_attention import PagedBatch, decode, decode_padded, paged_attention, varlen
from qwen2vl.config import TextConfig
from qwen2vl.engine.kv_cache import bytes_per_block, num_blocks_for
from tests.helpers.paged_cache import BS, HKV, HQ, D, build


@pytest.mark.parametrize(
    "cached, new",
    [
        ([0], [7]),  # a whole prompt, nothing cached
        ([5], [6]),  # a later prompt chunk (or a prefix-cache hit)
        ([0, 9, 3, 12], [5, 1, 4, 1]),  # prefill, decode, chunk, decode packed together
    ],
)
@pytest.mark.parametrize("fused", [False, True])  # SDPA's math path, or its fused kernel (matmul="int8")
def test_varlen_matches_causal_attention(cached, new, fused):
    q, k, v, cache, batch, want = build(cached, new)
    torch.testing.assert_close(varlen(q, k, v, cache.k[0], cache.v[0], batch, fused), want)
    torch.testing.assert_close(paged_attention(q, k, v, cache.k[0], cache.v[0], batch, fused), want)


@pytest.mark.parametrize("cached, new", [([0], [7]), ([5], [6]), ([0, 9, 3, 12], [5, 1, 4, 1])])
def test_bf16_attends_in_float32_copies_when_asked(cached, new):
    """What the CPU backend asks for where bf16 matmuls would be emulated: the fused kernel on float32
    copies of q and of the fresh and cached k/v, the output rounded once to bf16."""
    q, k, v, cache, batch, want = build(cached, new)
    q, k, v, kc, vc = (x.bfloat16() for x in (q, k, v, cache.k[0], cache.v[0]))
    got = paged_attention(q, k, v, kc, vc, batch, True, torch.float32)
    assert got.dtype == torch.bfloat16
    exact = varlen(*(x.float() for x in (q, k, v, kc, vc)), batch, True).bfloat16()
    assert torch.equal(got, exact)
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("cached", [[0, 13, 3, 30, 7], [9, 9, 9], [21]])  # padded + masked, or sliced
def test_batched_decode_matches_varlen_and_causal_attention(cached):
    q, k, v, cache, batch, want = build(cached, [1] * len(cached), seed=1)
    assert batch.is_decode
    got = decode(q, cache.k[0], cache.v[0], batch)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, varlen(q, k, v, cache.k[0], cache.v[0], batch))


@pytest.mark.parametrize("cached", [0, 3, 4, 21])
def test_lone_sequence_in_consecutive_blocks_reads_a_slice(cached):
    from qwen2vl.engine.runner import consecutive_run

    q, k, v, cache, batch, want = build([cached], [1], seed=2, consecutive=True)
    table = (batch.ctx_slots[0, ::BS] // BS).tolist()
    assert table[0] == 3 and consecutive_run(table, BS) == 3 * BS
    assert consecutive_run([3, 4, 6], BS) is None and consecutive_run([5], BS) == 5 * BS
    batch.ctx_run = consecutive_run(table, BS)
    torch.testing.assert_close(decode(q, cache.k[0], cache.v[0], batch), want)
    batch.ctx_run = 0  # the wrong run reads other keys: the slice path is really taken
    assert not torch.allclose(decode(q, cache.k[0], cache.v[0], batch), want)


@pytest.mark.parametrize("cached, new", [
    ([0, 9, 3, 12], [5, 1, 4, 1]),  # prefill, decode, chunk, decode packed together
    ([0, 13, 3, 30, 7], [1] * 5),  # decodes of different lengths: padded and masked
    ([9, 9, 9], [1] * 3),  # equal lengths: no mask
])
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")])
def test_slots_nothing_wrote_never_reach_the_output(cached, new, garbage):
    """The cache is allocated uninitialized: whatever bits its unwritten slots hold (NaN, Inf) must not
    change any path's output, not even through a masked score times a padded value."""
    q, k, v, cache, batch, want = build(cached, new, seed=3, fill=garbage)
    torch.testing.assert_close(paged_attention(q, k, v, cache.k[0], cache.v[0], batch), want)
    torch.testing.assert_close(varlen(q, k, v, cache.k[0], cache.v[0], batch), want)
    torch.testing.assert_close(varlen(q, k, v, cache.k[0], cache.v[0], batch, fused=True), want)
    if batch.is_decode:
        torch.testing.assert_close(decode(q, cache.k[0], cache.v[0], batch), want)
        # the CUDA graphs' torch fallback: tables padded with block 0 to a fixed width, always masked
        tables = F.pad(batch.ctx_slots[:, ::BS] // BS, (0, 2))
        wide = PagedBatch.context_slots(tables, BS, tables.shape[1] * BS, batch.ctx_lens_t)
        torch.testing.assert_close(decode_padded(q, cache.k[0], cache.v[0], wide, batch.ctx_lens_t), want)


def test_cache_is_sized_from_a_memory_budget():
    cfg = TextConfig(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=28)
    per_block = bytes_per_block(cfg, 16, torch.bfloat16)
    assert per_block == 2 * 28 * 16 * 2 * 128 * 2  # k and v, layers, tokens, kv heads, head dim, bytes
    n = num_blocks_for(cfg, 16, torch.bfloat16, torch.device("cpu"), kv_cache_gib=1.0, gpu_memory_utilization=0.9)
    assert n == 2**30 // per_block
    with pytest.raises(ValueError, match="kv_cache_gib"):
        num_blocks_for(cfg, 16, torch.bfloat16, torch.device("cpu"), kv_cache_gib=1e-6, gpu_memory_utilization=0.9)


def test_sdpa_gqa_agrees_with_repeated_heads():
    """The paths rely on enable_gqa grouping query heads [0, 1] onto kv head 0, as the model does."""
    q, k, v = torch.randn(HQ, 3, D), torch.randn(HKV, 5, D), torch.randn(HKV, 5, D)
    got = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0))
    torch.testing.assert_close(got, want)
