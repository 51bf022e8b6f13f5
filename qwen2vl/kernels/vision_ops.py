"""ctypes bindings of vision_ops.c: the vision tower's QuickGELU, 2-D rotary and attention softmax
on bf16 CPU tensors, in place, one C call each instead of several torch ops.

Compiled and cached like the other kernels (`build` in this package). `library()` is None where
they can't be had (no compiler, a failed compile, a CPU without AVX-512); it logs why, once, and
qwen2vl.fast_vision then leaves the torch code in place.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from qwen2vl.kernels import _load

SOURCE = Path(__file__).with_name("vision_ops.c")
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = _load(SOURCE, "vision kernels", "vision_ops_supported", "AVX-512", logging.INFO)
    if lib is not None:
        lib.quick_gelu.argtypes = [_ptr, _i64, _int]
        lib.vision_rotary.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _int]
        lib.softmax_rows.argtypes = [_ptr, _i64, _i64, _int]
    return lib


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take activations like `x` (bf16 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and library() is not None


def quick_gelu_(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 * x) in place on a contiguous bf16 tensor; returns x."""
    assert x.is_contiguous()
    library().quick_gelu(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """`apply_rotary(x.float(), cos, sin).to(bf16)` in place on the first `heads` heads of each row of
    qkv [N, >= heads * head_dim] (rows contiguous); cos, sin float32 [N, head_dim] contiguous."""
    assert qkv.stride(-1) == 1 and cos.dtype == sin.dtype == torch.float32
    cos, sin = cos.contiguous(), sin.contiguous()
    library().vision_rotary(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], heads,
                            head_dim, torch.get_num_threads())


def softmax_(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.softmax(scores, -1) in place on a contiguous bf16 tensor; returns scores."""
    assert scores.is_contiguous() and dim in (-1, scores.dim() - 1)
    n = scores.shape[-1]
    library().softmax_rows(scores.data_ptr(), scores.numel() // n, n, torch.get_num_threads())
    return scores
