"""layer_ops for CUDA: a decoder layer's small bf16 ops as Triton kernels, one launch each.

A graphed batch-1 decode step of the 2B on an H100 replays in ~3.4 ms where its weights stream in
~1 ms (docs/performance.md): the rest is ~30 tiny kernels per layer (each RMSNorm is 8 torch ops,
rotary 6, SiLU x up 2, residual adds 1 each), a few microseconds apiece even inside a CUDA graph.
These fuse each group into one kernel, with the same signatures and rounding points as
layer_ops.py (the C kernels for the CPU), so the decoder runs either (backends/kernel_ops.py):
- add_rms_norm: the residual add (rounded to bf16, as torch's `x + sublayer(x)`) and the RMSNorm
  after it (normalized in fp32, rounded, then times the weight);
- rotary_: q and k turned in place in the fused qkv output, each product rounded as torch does;
- silu_mul: bf16(silu(gate)) * up;
- write_kv: the new tokens' k and v into the paged cache (KVCache.write), one launch for both.
RMSNorm's sum and its 1 / sqrt differ from torch's by float32 rounding, so a norm can differ in
the last bf16 bit; rotary is exact. Imported only where triton is (CUDA machines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(v):
    """fp32 -> its bf16 rounding (to nearest even), still in fp32, by integer ops: the same bits on
    every backend (Triton's interpreter truncates in .to(bfloat16)). Storing it as bf16 is exact."""
    b = v.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, sum_ptr, w_ptr, out_ptr, D, eps, HAS_RES: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    v = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        v = _round(v + r)
        tl.store(sum_ptr + row * D + cols, v.to(tl.bfloat16), mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    normed = _round(v * inv)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, _round(normed * w).to(tl.bfloat16), mask=mask)


@triton.jit
def _rotary_kernel(qk_ptr, stride, cos_ptr, sin_ptr, D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                   ROUND_PRODUCTS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    mask = j < HALF
    x = qk_ptr + n * stride + h * D
    x1 = tl.load(x + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF + j, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + n * D + j, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + n * D + HALF + j, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + n * D + j, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + n * D + HALF + j, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x1, x2) = (-x2, x1)
    if ROUND_PRODUCTS:  # the decoder's rotary on bf16 tensors: torch rounds each product to bf16
        a1 = _round(_round(x1 * c1) - _round(x2 * s1))
        a2 = _round(_round(x2 * c2) + _round(x1 * s2))
    else:  # the vision tower's, in float32 (triton_vision_ops.py): rounded to bf16 once
        a1 = _round(x1 * c1 - x2 * s1)
        a2 = _round(x2 * c2 + x1 * s2)
    tl.store(x + j, a1.to(tl.bfloat16), mask=mask)
    tl.store(x + HALF + j, a2.to(tl.bfloat16), mask=mask)


@triton.jit
def _silu_mul_kernel(g_ptr, g_stride, u_ptr, u_stride, out_ptr, I, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(g_ptr + n * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + n * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)))
    tl.store(out_ptr + n * I + cols, _round(silu * u).to(tl.bfloat16), mask=mask)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_stride, v_stride, kc_ptr, vc_ptr, slots_ptr, ROW: tl.constexpr,
                     BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW
    slot = tl.load(slots_ptr + n).to(tl.int64)
    tl.store(kc_ptr + slot * ROW + cols, tl.load(k_ptr + n * k_stride + cols, mask=mask), mask=mask)
    tl.store(vc_ptr + slot * ROW + cols, tl.load(v_ptr + n * v_stride + cols, mask=mask), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> bool:
    """KVCache.write in one launch (two index_copy_ calls otherwise): k, v [N, Hkv, Dh] with each
    token's heads contiguous (views of the qkv output are) into the contiguous caches [..., Hkv, Dh]
    at slots [N]. Returns False, writing nothing, for layouts it doesn't take."""
    n, hkv, dh = k.shape
    row = hkv * dh
    if not (k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == dh and k_cache.is_contiguous()
            and v_cache.is_contiguous() and slots.is_contiguous()):
        return False
    if n:
        _write_kv_kernel[(n,)](k, v, k.stride(0), v.stride(0), k_cache, v_cache, slots, ROW=row,
                               BLOCK=triton.next_power_of_2(row), num_warps=1)
    return True


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """As layer_ops.add_rms_norm: (RMSNorm(x + residual), x + residual), or (RMSNorm(x), x)."""
    assert x.is_contiguous() and (residual is None or residual.is_contiguous())
    n, d = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    if n:
        _add_rms_norm_kernel[(n,)](x, x if residual is None else residual, total, weight, out, d, eps,
                                   HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(d), num_warps=4)
    return out, total


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """As layer_ops.rotary_: rotary in place on the first `heads` heads of each row of qkv."""
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    if qkv.shape[0]:
        half = head_dim // 2
        _rotary_kernel[(qkv.shape[0], heads)](qkv, qkv.stride(0), cos, sin, D=head_dim, HALF=half,
                                              BLOCK=triton.next_power_of_2(half), ROUND_PRODUCTS=True, num_warps=1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """As layer_ops.silu_mul: F.silu(gate) * up for gate, up [N, I] with contiguous rows."""
    assert gate.stride(1) == 1 and up.stride(1) == 1
    n, i = gate.shape
    out = torch.empty(n, i, dtype=gate.dtype, device=gate.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(i, block))](gate, gate.stride(0), up, up.stride(0), out, i, BLOCK=block,
                                                      num_warps=4)
    return out


def check(device) -> None:
    """Each kernel against the torch ops it replaces on random data; raises beyond a bf16 rounding
    (run once at load: a Triton that compiles wrongly, or not at all, keeps the torch code)."""
    import torch.nn.functional as F

    from qwen2vl.rotary import apply_rotary
    from qwen2vl.text import RMSNorm

    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16
    x, res = (torch.randn(3, 200, generator=g, device=device).to(bf) for _ in "xr")
    norm = RMSNorm(200, 1e-6).to(device, bf)
    norm.weight.data = torch.randn(200, generator=g, device=device).to(bf)
    out, total = add_rms_norm(x, res, norm.weight, norm.eps)
    torch.testing.assert_close(total, res + x, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(res + x), rtol=2**-7, atol=2**-7)
    qkv = torch.randn(3, 4 * 16, generator=g, device=device).to(bf)
    cos, sin = (torch.randn(3, 16, generator=g, device=device).to(bf) for _ in "cs")
    want = apply_rotary(qkv[:, :48].view(3, 3, 16), cos, sin).reshape(3, 48)
    got = qkv.clone()
    rotary_(got, cos, sin, 3, 16)
    torch.testing.assert_close(got[:, :48], want, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 48:], qkv[:, 48:], rtol=0, atol=0)
    gate_up = torch.randn(3, 2 * 1500, generator=g, device=device).to(bf)
    gate, up = gate_up.split(1500, 1)
    torch.testing.assert_close(silu_mul(gate, up), F.silu(gate) * up, rtol=2**-7, atol=2**-7)
    kv = torch.randn(3, 3 * 2 * 16, generator=g, device=device).to(bf)  # q|k|v heads side by side
    k, v = kv[:, 32:64].view(3, 2, 16), kv[:, 64:].view(3, 2, 16)
    caches = [torch.zeros(4, 2, 2, 16, device=device, dtype=bf) for _ in range(4)]
    slots = torch.tensor([5, 0, 2], device=device)
    assert write_kv(k, v, caches[0], caches[1], slots)
    caches[2].view(-1, 2, 16).index_copy_(0, slots, k)
    caches[3].view(-1, 2, 16).index_copy_(0, slots, v)
    torch.testing.assert_close(caches[:2], caches[2:], rtol=0, atol=0)
