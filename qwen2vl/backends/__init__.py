"""The speed seam: everything that makes the model fast on a given device lives under here.

- `cpu/`: C kernels compiled per CPU tier (isa.py says what the CPU can run, native.py builds and
  loads them), weight packing, and their Python wrappers;
- `cuda/`: Triton kernels (checked against torch at load) and decode CUDA graphs.
The torch code in the model files is the reference every backend is tested against.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cuda import triton_kernels


def ops_for(x: torch.Tensor, cpu_ops, triton_name: str):
    """The kernel module that takes activations like `x`: `cpu_ops` (C kernels) where its
    supports(x), the Triton module `triton_name` for bf16 on CUDA where it loads, else None."""
    if cpu_ops.supports(x):
        return cpu_ops
    if x.device.type == "cuda" and x.dtype == torch.bfloat16:
        return triton_kernels(triton_name, x.device)
    return None
