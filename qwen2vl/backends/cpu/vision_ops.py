"""ctypes bindings of vision_ops.c: the vision tower's QuickGELU, 2-D rotary and attention softmax
on bf16 or float32 CPU tensors (the tower computes in float32 where the CPU has no bf16 matmuls), in
place, one C call each instead of several torch ops.

Built and loaded by native.py for this CPU's tier. `library()` is None where they can't be had (no
compiler, a failed compile, a CPU without the features); native.py logs why, once, and
the CPU backend then leaves the torch code in place.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cpu import native

# the width of torch's fp32 vectors, whose order softmax_rows keeps in its sum (torch's CPU
# capability, read once at its start, is what counts here, not our tier)
TORCH_LANES = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8


def library():
    """vision_ops.c loaded, or None where it can't be built or run here."""
    return native.library("vision_ops")


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take activations like `x` (bf16 or float32 on the CPU)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and library() is not None


def _f32(x: torch.Tensor) -> bool:
    assert x.dtype in (torch.bfloat16, torch.float32)
    return x.dtype == torch.float32


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 * x) in place on a contiguous bf16 or float32 tensor; returns x. In float32 the
    last numel % TORCH_LANES values go through torch, whose scalar tail (libm's exp) they are."""
    assert x.is_contiguous()
    n, flat = x.numel(), x.view(-1)
    head = n - n % TORCH_LANES if _f32(x) else n
    fn = library().quick_gelu_f32 if _f32(x) else library().quick_gelu
    fn(x.data_ptr(), head, torch.get_num_threads())
    if head < n:
        flat[head:] = flat[head:] * torch.sigmoid(1.702 * flat[head:])
    return x


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """`apply_rotary(x.float(), cos, sin).to(qkv.dtype)` in place on the first `heads` heads of each row of
    qkv [N, >= heads * head_dim] (rows contiguous); cos, sin float32 [N, head_dim] contiguous."""
    assert qkv.stride(-1) == 1 and cos.dtype == sin.dtype == torch.float32
    cos, sin = cos.contiguous(), sin.contiguous()
    fn = library().vision_rotary_f32 if _f32(qkv) else library().vision_rotary
    fn(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], heads, head_dim,
       torch.get_num_threads())


def softmax_(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.softmax(scores, -1) in place on a contiguous bf16 or float32 tensor; returns scores (a new
    tensor from torch for float32 rows that aren't a multiple of torch's vector width long: torch
    sums their ends in an order the kernel doesn't copy)."""
    assert scores.is_contiguous() and dim in (-1, scores.dim() - 1)
    n = scores.shape[-1]
    if _f32(scores) and n % TORCH_LANES:
        return torch.softmax(scores, -1)
    fn = library().softmax_rows_f32 if _f32(scores) else library().softmax_rows
    fn(scores.data_ptr(), scores.numel() // n, n, TORCH_LANES, torch.get_num_threads())
    return scores
