"""vision_ops for CUDA: the vision tower's QuickGELU and 2-D rotary as Triton kernels, in place.

On a GPU the tower of one 448x448 image (1024 patches, 32 blocks) is bound by kernel launches, not
arithmetic: torch runs the float32 rotary of q and k as ~14 kernels a block and QuickGELU as 3.
These are one launch each, with the signatures and rounding points of vision_ops.py (the C
kernels for the CPU), so the tower runs either (backends/kernel_ops.py); the attention stays SDPA (flash) on CUDA.
- quick_gelu_: t = bf16(1.702 x), s = bf16(sigmoid(t)), x' = bf16(x s);
- rotary_: `apply_rotary(x.float(), cos, sin).to(bf16)` on the first `heads` heads of each qkv row,
  each product and sum rounded to float32 as torch does (no fused multiply-add: launched with
  enable_fp_fusion=False); the decoder's rotary kernel (triton_layer_ops.py) with its float32
  rounding points.
The sigmoid's exp may differ from torch's in the last float32 bit, so QuickGELU can differ in the
last bf16 bit; rotary is exact. Imported only where triton is (CUDA machines, or the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2vl.backends.cuda.triton_layer_ops import _rotary_kernel, _round


@triton.jit
def _quick_gelu_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    t = _round(x * 1.702)
    s = _round(1.0 / (1.0 + tl.exp(-t)))
    tl.store(x_ptr + i, _round(x * s).to(tl.bfloat16), mask=mask)


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 * x) in place on a contiguous bf16 tensor; returns x."""
    assert x.is_contiguous() and x.dtype == torch.bfloat16
    block = 1024
    if x.numel():
        _quick_gelu_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), BLOCK=block, num_warps=4)
    return x


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """As vision_ops.rotary_: in place on the first `heads` heads of each row of qkv (rows with
    contiguous values); cos, sin float32 [N, head_dim]."""
    assert qkv.stride(-1) == 1 and cos.dtype == sin.dtype == torch.float32
    cos, sin = cos.contiguous(), sin.contiguous()
    if qkv.shape[0]:
        half = head_dim // 2
        _rotary_kernel[(qkv.shape[0], heads)](qkv, qkv.stride(0), cos, sin, D=head_dim, HALF=half,
                                              BLOCK=triton.next_power_of_2(half), ROUND_PRODUCTS=False,
                                              num_warps=1, enable_fp_fusion=False)


def check(device) -> None:
    """Each kernel against the torch code it replaces on random data; raises beyond a bf16
    rounding (run once at load: a Triton that compiles wrongly keeps the torch code)."""
    from qwen2vl.rotary import apply_rotary

    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(3, 1000, generator=g, device=device) * 4).to(torch.bfloat16)
    torch.testing.assert_close(quick_gelu_(x.clone()), x * torch.sigmoid(1.702 * x), rtol=2**-7, atol=1e-6)
    qkv = torch.randn(5, 3 * 2 * 40, generator=g, device=device).to(torch.bfloat16)  # [q | k | v], 2 heads of 40
    cos, sin = (torch.randn(5, 40, generator=g, device=device) for _ in "cs")
    got = qkv.clone()
    rotary_(got, cos, sin, 4, 40)
    want = apply_rotary(qkv[:, :160].view(5, 4, 40).float(), cos, sin).to(torch.bfloat16).reshape(5, 160)
    torch.testing.assert_close(got[:, :160], want, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 160:], qkv[:, 160:], rtol=0, atol=0)
