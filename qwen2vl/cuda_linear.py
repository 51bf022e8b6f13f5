"""CUDA linears for batch-1 decode: one row through a Triton GEMV (kernels/triton_gemv.py), the rest
through F.linear (cuBLAS), swapped in after loading (`speed_up_cuda_linears`).

A graphed batch-1 decode step of the 2B on an H100 streams ~2.6 GB of decoder weights; cuBLAS's
M=1 products reach a fraction of the memory rate on its small shapes (docs/performance.md, "GPU").
The module keeps the nn.Linear's own parameters (same names, a tied head stays tied), so
state_dict and every other path are unchanged; prefill and batched decode rows still take cuBLAS.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.linear import replace_linears

log = logging.getLogger(__name__)


@functools.cache
def cuda_gemv(device: torch.device):
    """kernels.triton_gemv where triton imports and its kernel agrees with F.linear on `device`,
    else None (logged once)."""
    try:
        from qwen2vl.kernels import triton_gemv

        triton_gemv.check(device)
        return triton_gemv
    except Exception as e:  # no triton, a compile error, or wrong numbers: all mean cuBLAS
        log.warning("Triton GEMV unavailable (%s: %s); decode linears keep cuBLAS", type(e).__name__, e)
        return None


class GemvLinear(nn.Module):
    """Drop-in for a bf16 nn.Linear: single rows through the Triton GEMV, anything else F.linear."""

    def __init__(self, linear: nn.Linear, gemv):
        super().__init__()
        self.weight, self.bias, self.gemv = linear.weight, linear.bias, gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.dtype == self.weight.dtype == torch.bfloat16 and x.is_contiguous():
            return self.gemv.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}, Triton GEMV"


def speed_up_cuda_linears(model: nn.Module, skip: tuple[str, ...] = ("visual",)) -> int:
    """Swap the nn.Linears of a bf16 CUDA `model` (the decoder's and the head; the vision tower runs
    whole images) for GemvLinears, where the kernel runs here; returns how many were swapped."""
    weight = next(model.parameters())
    if weight.device.type != "cuda" or weight.dtype != torch.bfloat16 or (gemv := cuda_gemv(weight.device)) is None:
        return 0
    return replace_linears(model, lambda linear: GemvLinear(linear, gemv), skip)
