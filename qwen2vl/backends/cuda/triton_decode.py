"""Paged decode attention as one Triton kernel: one query token per sequence, read in place.

The torch decode path (paged_attention.decode) first gathers every sequence's keys into a padded
[B, Hkv, L, Dh] copy and then runs SDPA over it. This kernel reads the cache blocks where they lie:
program (b, h) walks sequence b's block table up to its context length, both read from device
tensors, so nothing about the batch is baked into the launch beyond B. That makes it safe to
capture in a CUDA graph and replay with new tables and lengths every step.

GQA: query head h reads kv head h // (Hq / Hkv) straight from the cache; k/v are never repeated.
Online softmax (running max m, running sum l) in float32, as flash attention does, so one pass over
the keys suffices and no [L] score row is ever stored.

Split over the context (flash decoding) where the batch alone can't fill the GPU: program
(b, h, s) walks the s-th of `splits` equal slices of sequence b's keys and leaves its running max,
sum and unnormalized output; a second kernel combines the slices. At batch 1 the 2B has 12 query
heads, so without the split 12 programs walked the whole context in 32-key steps, each waiting on
the last: 12 us a layer for a ~200-token context on an H100, 18% of the decode graph (docs/
performance.md, run 6). Slices are computed from the context length on the device, so `splits`
is the only thing fixed at capture; at batch sizes that fill the GPU it is 1, and the first
kernel writes the output itself.

Imported only where triton is: on CUDA (cuda_graph.py decides), or in Triton's interpreter for the
tests; the torch path is the fallback and the reference it is tested against
(tests/test_engine_cuda_graph.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, part_ptr,
    stride_qb, stride_qh,
    stride_kblk, stride_kslot, stride_kh,
    stride_vblk, stride_vslot, stride_vh,
    stride_tb, stride_ob, stride_oh,
    scale,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    kvh = h // GROUP
    ctx = tl.load(lens_ptr + b)  # keys 0..ctx-1 of this sequence, ctx >= 1
    # this program's slice [lo, hi): whole BLOCK_N steps, so slice 0 is never empty; later ones may be
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)

    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32) * scale

    # [1]-shaped running max / sum: loop-carried values keep one type from the first iteration on
    m = tl.zeros([1], dtype=tl.float32) - float("inf")
    l = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # token indices within the sequence
        nmask = n < hi
        block = tl.load(tables_ptr + b * stride_tb + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        slot = n % BLOCK_SIZE
        kv_mask = nmask[:, None] & dmask[None, :]
        k_off = block * stride_kblk + slot * stride_kslot + kvh * stride_kh
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        s = tl.sum(k * q[None, :], 1)  # [N]
        s = tl.where(nmask, s, float("-inf"))
        # every iteration has at least one real key (start < hi), so m_new is finite: no NaN
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)  # rescales what was summed under the old max; 0 on the first pass
        p = tl.exp(s - m_new)  # [N], 0 on masked keys
        l = l * alpha + tl.sum(p, 0)
        v_off = block * stride_vblk + slot * stride_vslot + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    if SPLITS == 1:
        out = acc / l
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)
    else:  # partials [B, Hq, SPLITS, D_PAD + 2] in float32: acc, then m and l (-inf and 0 if empty)
        row = part_ptr + ((b * tl.num_programs(1) + h) * SPLITS + split) * (D_PAD + 2)
        tl.store(row + d, acc)
        one = tl.arange(0, 1)
        tl.store(row + D_PAD + one, m)
        tl.store(row + D_PAD + 1 + one, l)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, stride_ob, stride_oh, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rows = part_ptr + ((b * tl.num_programs(1) + h) * SPLITS + tl.arange(0, SPLITS)) * (D_PAD + 2)  # [S]
    m = tl.load(rows + D_PAD)
    l = tl.load(rows + D_PAD + 1)
    d = tl.arange(0, D_PAD)
    acc = tl.load(rows[:, None] + d[None, :])  # [S, D_PAD]
    m_all = tl.max(m, 0)  # finite: slice 0 always has keys
    w = tl.where(l > 0, tl.exp(m - m_all), 0.0)  # empty slices weigh nothing
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def num_splits(batch: int, heads: int, device: torch.device) -> int:
    """Slices of the context per (sequence, head): enough programs for two per multiprocessor,
    at most 16 (a power of two; 1 once the batch's heads alone are that many)."""
    want = -(-2 * multiprocessors(device) // (batch * heads))
    return min(16, triton.next_power_of_2(want))


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_tables: torch.Tensor, ctx_lens: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """q [B, Hq, Dh]; k_cache/v_cache [num_blocks, block_size, Hkv, Dh] of one layer;
    block_tables [B, W] (int32 or int64, columns past a sequence's blocks are never read);
    ctx_lens [B] (>= 1) -> out [B, Hq, Dh] in q's dtype. No host sync: graph-capturable.
    `splits` (a power of two) overrides num_splits."""
    b, hq, dh = q.shape
    _, block_size, hkv, _ = k_cache.shape
    assert hq % hkv == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q.contiguous()
    out = torch.empty_like(q)
    splits = splits or num_splits(b, hq, q.device)
    assert splits & (splits - 1) == 0, "splits must be a power of two (the combine kernel's arange)"
    d_pad = triton.next_power_of_2(dh)
    part = torch.empty(b, hq, splits, d_pad + 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    block_n = 64 if dh <= 64 else 32  # [BLOCK_N, Dh] float32 tiles of k and v stay in registers
    _decode_kernel[(b, hq, splits)](
        q, k_cache, v_cache, out, block_tables, ctx_lens, part,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        dh**-0.5,
        GROUP=hq // hkv, BLOCK_SIZE=block_size, HEAD_DIM=dh, D_PAD=d_pad, BLOCK_N=block_n, SPLITS=splits,
        num_warps=4,
    )
    if splits > 1:
        _combine_kernel[(b, hq)](part, out, out.stride(0), out.stride(1), HEAD_DIM=dh, D_PAD=d_pad, SPLITS=splits,
                                 num_warps=1)
    return out
