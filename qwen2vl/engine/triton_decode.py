"""Paged decode attention as one Triton kernel: one query token per sequence, read in place.

The torch decode path (paged_attention.decode) first gathers every sequence's keys into a padded
[B, Hkv, L, Dh] copy and then runs SDPA over it. This kernel reads the cache blocks where they lie:
program (b, h) walks sequence b's block table up to its context length, both read from device
tensors, so nothing about the batch is baked into the launch beyond B. That makes it safe to
capture in a CUDA graph and replay with new tables and lengths every step.

GQA: query head h reads kv head h // (Hq / Hkv) straight from the cache; k/v are never repeated.
Online softmax (running max m, running sum l) in float32, as flash attention does, so one pass over
the keys suffices and no [L] score row is ever stored.

One program per (sequence, query head) and no split over the context: plenty of programs at batch
sizes that matter for throughput; at batch 1 a long context is walked by Hq programs only (a split
into partitions plus a reduce is the next step if that shows up in profiles).

Imported only on CUDA with triton present (cuda_graph.py decides); the torch path is the fallback
and the reference it is tested against (tests/test_engine_cuda_graph.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr,
    stride_qb, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_vblk, stride_vslot, stride_vh,
    stride_tb, stride_ob, stride_oh,
    scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    ctx = tl.load(lens_ptr + b)  # keys 0..ctx-1 of this sequence, ctx >= 1

    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32) * scale

    # [1]-shaped running max / sum: loop-carried values keep one type from the first iteration on
    m = tl.zeros([1], dtype=tl.float32) - float("inf")
    l = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # token indices within the sequence
        nmask = n < ctx
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        slot = n % BLOCK_SIZE
        kv_mask = nmask[:, None] & dmask[None, :]
        k_off = block * stride_kblk + slot * stride_kslot + kvh * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        s = tl.sum(k * q[None, :], 1)  # [N]
        s = tl.where(nmask, s, float("-inf"))
        # every iteration has at least one real key (start < ctx), so m_new is finite: no NaN
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max; 0 on the first pass
        p = tl.exp(s - m_new)  # [N], 0 on masked keys
        l = l * alpha + tl.sum(p, 0)
        v_off = block * stride_vblk + slot * stride_vslot + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    out = acc / l
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Dh]; k_cache/v_cache [num_blocks, block_size, Hkv, Dh] of one layer;
    block_tables [B, W] (int32 or int64, columns past a sequence's blocks are never read);
    ctx_lens [B] (>= 1) -> out [B, Hq, Dh] in q's dtype. No host sync: graph-capturable."""
    b, hq, dh = q.shape
    _, block_size, hkv, _ = k_cache.shape
    assert hq % hkv == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q.contiguous()
    out = torch.empty_like(q)
    block_n = 64 if dh <= 64 else 32  # [BLOCK_N, Dh] float32 tiles of k and v stay in registers
    _decode_kernel[(b, hq)](
        q, k_cache, v_cache, out, block_tables, ctx_lens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        dh**-0.5,
        GROUP=hq // hkv, BLOCK_SIZE=block_size, HEAD_DIM=dh, D_PAD=triton.next_power_of_2(dh), BLOCK_N=block_n,
        num_warps=4,
    )
    return out
