"""A bf16 matrix-vector product for CUDA: one token times a weight [N, K], as a Triton kernel.

Batch-1 decode multiplies one row by every weight of the model, so its speed is the rate at which
weights stream. cuBLAS runs an M=1 product as a GEMM: for the 2B's small shapes (o_proj 1536 x
1536, down_proj 1536 x 8960) it puts too few bytes in flight to fill an H100's memory system.
Here each program reads BLOCK_N whole weight rows, BLOCK_K columns at a time (16-byte loads, every
thread eight or more in flight), and keeps BLOCK_N x BLOCK_K float32 partial sums, summed across
the block once at the end; the bias is added in float32 and the result rounded to bf16 once, as
cuBLAS does. The sum runs in another order than cuBLAS's, so outputs differ in the last bf16 bit.

`gemv(x, weight, bias)` takes x [1, K]; cuda_linear.GemvLinear routes single rows here and
everything else to F.linear. Imported only where triton is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2vl.kernels.triton_layer_ops import _round


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, _round(y).to(tl.bfloat16), mask=row_mask)


def config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight [n, k]: a whole row of up to 2048 columns per
    step (k = 1536 in one step), four rows a program, so the 1536-row shapes still make 384
    programs for the H100's 132 SMs."""
    return 4, min(2048, triton.next_power_of_2(k)), 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for one bf16 row x [1, K] (or [K]) and a contiguous weight [N, K];
    `block` overrides config() (benchmarks/gpu_gemv.py sweeps it)."""
    n, k = weight.shape
    assert x.numel() == k and x.is_contiguous() and weight.is_contiguous()
    assert x.dtype == weight.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = block or config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, weight if bias is None else bias, out, n, k,
                                             HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps)
    return out


def check(device) -> None:
    """gemv against F.linear in float32 on random data; raises beyond a bf16 rounding (run once at
    load: a Triton that compiles wrongly keeps cuBLAS)."""
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in ((37, 200), (5, 3000)):  # a partial row block; several K steps with a partial last one
        x, w, b = (torch.randn(*shape, generator=g, device=device).to(torch.bfloat16)
                   for shape in ((1, k), (n, k), (n,)))
        want = torch.nn.functional.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(gemv(x, w, b).float(), want, rtol=2**-7, atol=1e-2)
        torch.testing.assert_close(gemv(x, w).float(), want - b.float(), rtol=2**-7, atol=1e-2)
