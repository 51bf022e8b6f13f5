"""W4A16 / W8A16 for CUDA: y = x @ W^T (+ bias) straight from a GPTQ/AWQ checkpoint's integer codes,
each weight tile dequantized in registers, never the whole weight in memory.

The layout it reads (backends/packed_linear.py packs it once, at load, from a gptq.IntWeight):
  qweight [K / P, N] int32  P = 32 / bits codes per word, packed along K as GPTQ's own qweight (value j
                            of word row r is input feature r * P + j): a tile's words [BLOCK_K / P,
                            BLOCK_N] are read along N, coalesced, and unpacked by shifts. A GPTQ
                            checkpoint's qweight is this already; AWQ's (packed along N, interleaved)
                            and act-order's (sorted by group at unpack) are reordered once at load
  scales  [G, N] fp16       fp16 where the checkpoint's are (every GPTQ/AWQ packer writes fp16), else
                            float32: 2 bytes per group and column against 64 bytes of 4-bit codes in
                            groups of 128 (float32 scale and zero, as the CPU's Int4Linear keeps, would
                            be 12% more bytes than the codes on a path that is all weight reads)
  zeros   [G, N] uint8      the integer zero points: w = (q - zero) * scale is exact in float32 (a 9-bit
                            integer times a 16-bit float), as gptq.IntWeight.dequantize
  perm    [K] int32         act-order only: codes column k multiplies input feature perm[k]; the kernel
                            reads x through it, so no permuted copy of x is made
A tile spans BLOCK_K features inside one group (BLOCK_K, a power of two, divides the group size): one
scale and zero row per tile. So the group size must be a multiple of 16, tl.dot's least K (every
published checkpoint's is: 32, 64, 128 or a whole row of a multiple of 128).

One kernel, two ways to multiply a tile, picked by the rows M (decode's batch or a prefill's tokens):
- M <= GEMV_ROWS (decode): the rows times the float32 weight tile, broadcast and summed on the CUDA
  cores (the tensor cores want 16 rows), the weights exact;
- more rows (prefill): BLOCK_M rows times the weight tile rounded to x's dtype on the tensor cores
  (tl.dot, float32 accumulation), as a bf16 model rounds its own weights.
Decode has few columns to share among the multiprocessors (the 2B's o_proj: 1536 wide, 24 tiles of
64), so for up to SPLIT_ROWS rows the K loop is split over programs too, about 4 per multiprocessor;
their float32 partial sums are added, in order, by a second small kernel (deterministic, unlike
atomics), which also adds the bias.
Block sizes and splits are fixed heuristics, not autotuned (the autotuner times configs on a GPU; the
tests run these kernels in Triton's interpreter), and not yet tuned on one: benchmarks/gpu_gptq_decode.py
--sweep times the alternatives.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qwen2vl.backends.cuda.triton_decode import multiprocessors
from qwen2vl.backends.packed_linear import GROUP_MULTIPLE, PackedIntLinear
from qwen2vl.gptq import IntWeight

GEMV_ROWS = 4  # up to this many rows: CUDA cores; more: tensor cores
# Triton's interpreter (3.9) multiplies bf16 tiles in tl.dot as the integers their bits spell (numpy has no
# bf16): under it the tensor-core path casts its tiles to float32 after the same rounding
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SPLIT_ROWS = 16  # up to this many rows the K loop may be split (partial sums stay small next to the weights)


@triton.jit
def _int_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr, M, N, K, stride_xm, group,
                     per_split, BITS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rw = tl.arange(0, BLOCK_K // PACK)  # the tile's word rows
    shifts = tl.arange(0, PACK) * BITS
    tiles = K // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, tl.minimum(pid_k * per_split + per_split, tiles)):
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        if HAS_PERM:
            k = tl.load(perm_ptr + k)  # the input features the codes' columns multiply
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
        words = tl.load(qw_ptr + (t * (BLOCK_K // PACK) + rw)[:, None].to(tl.int64) * N + rn[None, :],
                        mask=n_ok[None, :], other=0)  # [BLOCK_K / PACK, BLOCK_N]
        # value j of word row r is feature r * PACK + j: [r, j, n] flattens to [k, n] in that order
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # the sign bits masked off
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        g = t * BLOCK_K // group
        scale = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0).to(tl.float32)
        w = (q.to(tl.float32) - zero[None, :]) * scale[None, :]  # [BLOCK_K, BLOCK_N], exact
        if DOT and DOT_FP32:  # Triton's interpreter only: the same rounded weights, multiplied in float32
            acc += tl.dot(x.to(tl.float32), w.to(x_ptr.dtype.element_ty).to(tl.float32))
        elif DOT:
            acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # split 0 of the output, or this program's slice of the float32 partial sums [splits, M, N]
    out = out_ptr + (pid_k * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, b_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):  # in order: the same sum on every run
        acc += tl.load(part_ptr + (s * M + row) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def block_k(group_size: int, most: int) -> int:
    """The largest power of two up to `most` that divides the group size: a tile stays in one group."""
    b = most
    while group_size % b:
        b //= 2
    return b


def int_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
             block_n: int | None = None, split: int | None = None) -> torch.Tensor:
    """x [M, K] bf16 or fp16 (rows of unit stride) -> x @ W^T + bias [M, N] in x's dtype, W in the module
    doc's layout. No host sync: graph-capturable. `block_n` and `split` (programs along K, decode's
    rows only) override the heuristics, for benchmarks."""
    m, k = x.shape
    n = qweight.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"int_gemm takes bfloat16 or float16 activations, not {x.dtype}")
    if bits not in (4, 8) or qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"int_gemm: {bits}-bit qweight {tuple(qweight.shape)} doesn't hold in_features={k}")
    if group_size % GROUP_MULTIPLE or k % group_size:
        raise ValueError(f"int_gemm takes groups of a multiple of {GROUP_MULTIPLE} features that divide "
                         f"in_features={k}, not {group_size}")
    assert x.stride(1) == 1 and scales.shape == zeros.shape == (k // group_size, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    dot = m > GEMV_ROWS
    block_m = min(64, max(16, triton.next_power_of_2(m))) if dot else triton.next_power_of_2(m)
    block_n = block_n or 64
    bk = block_k(group_size, 64 if dot else 128 // block_m)  # the GEMV's [M, K, N] product stays ~8k values
    tiles = k // bk
    if split is None:
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split = 1 if m > SPLIT_ROWS else max(1, min(tiles, 4 * multiprocessors(x.device) // programs))
    per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per_split)  # no split left without tiles
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _int_gemm_kernel[grid](x, qweight, scales, zeros, qweight if perm is None else perm,
                           scales if bias is None else bias, part, m, n, k, x.stride(0), group_size, per_split,
                           BITS=bits, HAS_PERM=perm is not None, HAS_BIAS=bias is not None and split == 1,
                           DOT=dot, DOT_FP32=INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk, num_warps=4)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(m, triton.cdiv(n, block))](part, part if bias is None else bias, out, m, n,
                                                        SPLITS=split, HAS_BIAS=bias is not None, BLOCK=block,
                                                        num_warps=4)
    return out


def check(device) -> None:
    """The kernel through PackedIntLinear against the dequantized weights on random codes, 4 bits in
    groups of 32 with act-order and a bias, 8 bits in one group per row, for 1 and 20 rows (both ways
    of multiplying, split and not); raises beyond a 16-bit rounding (run once at load: a Triton that
    compiles wrongly, or not at all, keeps the dequantizing linears)."""
    g = torch.Generator().manual_seed(0)
    n, k = 40, 128
    for bits, group, act_order in ((4, 32, True), (8, k, False)):
        top = 2**bits
        w = IntWeight(torch.randint(0, top, (n, k), generator=g, dtype=torch.uint8),
                      torch.randint(0, top, (n, k // group), generator=g).to(torch.int16),
                      torch.rand(n, k // group, generator=g).half().float() / top, group, bits,
                      torch.randperm(k, generator=g) if act_order else None)
        bias = torch.randn(n, generator=g).to(device, torch.bfloat16)
        linear = PackedIntLinear.from_int_weight(w, bias, torch.device(device), int_gemm)
        dense = w.dequantize().to(device)
        for rows in (1, 20):
            x = torch.randn(rows, k, generator=g).to(device, torch.bfloat16)
            want = x.float() @ dense.T + bias.float()
            bound = 2**-6 * (x.float().abs() @ dense.abs().T + bias.float().abs()) + 1e-6
            err = (linear(x).float() - want).abs()
            if not bool((err <= bound).all()):
                raise AssertionError(f"int_gemm ({bits}-bit, groups of {group}, {rows} rows) is off by up to "
                                     f"{err.max().item():.3g} (bound {bound.min().item():.3g})")
