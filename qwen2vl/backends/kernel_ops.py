"""The reference ops' interface (backends/reference.py) over modules of fast kernels.

The C kernels (backends/cpu/layer_ops.py, vision_ops.py) and the Triton ones (backends/cuda/
triton_*.py) share signatures: they work in place where they can (rotary inside the qkv output,
QuickGELU and softmax on their input) and take only some activations (bf16 on their device).
These classes give the model files TorchOps' calls over them: `for_input(x)` answers the kernels
where they take `x`, else the torch code; an op a kernel module lacks is the torch one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen2vl.backends.reference import TORCH_OPS, TorchOps


class TextKernels(TorchOps):
    """A decoder layer's small ops from `kernels` (add_rms_norm, rotary_, silu_mul)."""

    def __init__(self, kernels, takes: Callable[[torch.Tensor], bool]):
        self.kernels, self.takes = kernels, takes
        self.add_rms_norm, self.silu_mul = kernels.add_rms_norm, kernels.silu_mul

    def for_input(self, x: torch.Tensor) -> TorchOps:
        return self if self.takes(x) else TORCH_OPS

    def rotary(self, qkv, cos, sin, heads: int, head_dim: int) -> torch.Tensor:
        self.kernels.rotary_(qkv, cos, sin, heads, head_dim)
        return qkv[:, : heads * head_dim].view(-1, heads, head_dim)


class VisionKernels(TorchOps):
    """The vision tower's QuickGELU and rotary from `kernels` (quick_gelu_, rotary_), and its softmax
    where the module has one (softmax_). `matmul_min`: attention.block_diagonal_attention's (0: SDPA
    for every block, where its kernel is the faster one)."""

    def __init__(self, kernels, takes: Callable[[torch.Tensor], bool], matmul_min: int | None = None):
        self.kernels, self.takes, self.matmul_min = kernels, takes, matmul_min

    def for_input(self, x: torch.Tensor) -> TorchOps:
        return self if self.takes(x) else TORCH_OPS

    def quick_gelu(self, x) -> torch.Tensor:
        return self.kernels.quick_gelu_(x)

    def softmax(self, scores, dim: int = -1) -> torch.Tensor:
        if hasattr(self.kernels, "softmax_"):
            return self.kernels.softmax_(scores, dim)
        return TORCH_OPS.softmax(scores, dim)

    def vision_rotary(self, qkv, cos, sin, heads: int, head_dim: int) -> torch.Tensor:
        self.kernels.rotary_(qkv, cos, sin, heads, head_dim)
        return qkv[:, : heads * head_dim].view(-1, heads, head_dim)
