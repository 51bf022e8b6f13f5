"""A GPTQ/AWQ checkpoint's linears (gptq.QuantizedLinear) repacked once, at load, into our int kernels.

GPTQ and AWQ store w = (q - zero) * s with integer zeros. Where the CUDA backend's W4A16/W8A16 kernel
loaded (it passes `int_gemm`) and the model is 16-bit, every 4- or 8-bit weight in groups of a multiple
of 16 (every published one) goes to PackedIntLinear: the codes in GPTQ's own packing, fp16 scales,
integer zeros, act-order read through a permutation inside the kernel (cuda/triton_int_gemm.py).
Elsewhere (the CPU; CUDA without Triton) our layouts take:
- 4 bits, groups a multiple of 32: Int4Linear, whose w = (q - 8) * s + z is the same weight with
  z = (8 - zero) * s. Groups of 32..256 go as they are; a larger group (-1, one per row, included)
  repeats its scale and zero over sub-groups of the largest of 256/128/64/32 dividing it (exact).
  Scales and z stay float32: fp16 scales times integers under 2**9 are exact there, so the weights
  the kernel reads equal the checkpoint's bit for bit (bf16 would round the fp16 scales; the kernel
  reads 4 more bytes per group of 128, 6% over bf16's, benchmarks/gptq_decode.py).
- 8 bits, one group per row, zero 128 everywhere (symmetric per-channel): Int8Linear, q = code - 128,
  float32 scales.
- 8 bits otherwise (Qwen's GPTQ-Int8: groups of 128), groups a multiple of 32, on the CPU in bf16 or
  float32: Int8GroupLinear (int8_groups.py), w = (code - 128) * s + z with z = (128 - zero) * s, the
  groups as for 4 bits; 1 byte a weight + 8 per group of 128, the int kernel's INT8G kind (without
  it, at tier none, dequantized per call).
- act-order (`desc_act`): gptq.unpack sorted the code columns by group, so the activations are
  permuted the same way before the kernel (PermutedLinear), as vLLM does.
- anything else (groups not a multiple of 32; 8 bits in groups off the CPU or in fp16): dequantized
  once to the model's dtype, logged.
On CUDA without the Triton kernel, Int4Linear and Int8Linear dequantize per call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from qwen2vl.backends.cpu import gemm
from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.packed_linear import PackedIntLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear
from qwen2vl.gptq import IntWeight, QuantizedLinear

log = logging.getLogger("qwen2vl.quant")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes Int4Linear (and Int8GroupLinear) take, largest first


class PermutedLinear(nn.Module):
    """`linear` on the input features reordered by `perm` (act-order checkpoints)."""

    def __init__(self, linear: nn.Module, perm: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("perm", perm)
        self.out_features, self.in_features = linear.out_features, linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.index_select(-1, self.perm))


def _kernel_group(w: IntWeight) -> int | None:
    """The largest group our kernels take that divides w's (a whole row's, -1, included), or None."""
    return next((g for g in INT4_GROUPS if w.group_size % g == 0), None)


def _kernel_groups(w: IntWeight, group: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w's scales and zeros z = (offset - zero) * s per group of `group` (a divisor of w's: repeated, exact)."""
    repeat = w.group_size // group
    scales = w.scales.repeat_interleave(repeat, 1)
    return scales, (offset - w.zeros.float()).repeat_interleave(repeat, 1) * scales


def _is_per_channel_int8(w: IntWeight) -> bool:
    return w.bits == 8 and w.group_size == w.shape[1] and bool((w.zeros == 128).all())


def repack(module: QuantizedLinear, dtype: torch.dtype, device: torch.device, name: str = "",
           int_gemm: Callable | None = None) -> nn.Module:
    """Our kernel's linear for one checkpoint linear (see the module doc for which). `int_gemm`: the
    CUDA backend's kernel function (cuda/triton_int_gemm.int_gemm) where it loaded."""
    w = module.int_weight
    n, k = w.shape
    bias = None if module.bias is None else module.bias.to(device)
    if int_gemm is not None and dtype in (torch.bfloat16, torch.float16) and PackedIntLinear.takes(w):
        return PackedIntLinear.from_int_weight(w, bias, device, int_gemm)
    cpu = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)  # what our int kernels take
    blocked = cpu and k % gemm.QK == 0 and gemm.int_library() is not None
    group = _kernel_group(w)
    if w.bits == 4 and group is not None:
        linear = Int4Linear.from_codes(w.codes, *_kernel_groups(w, group, 8), bias, group, blocked)
    elif _is_per_channel_int8(w):
        q = (w.codes.to(torch.int16) - 128).to(torch.int8)
        linear = Int8Linear.from_codes(q, w.scales[:, 0].contiguous(), bias, blocked)
    elif w.bits == 8 and group is not None and cpu:
        linear = Int8GroupLinear.from_codes(w.codes, *_kernel_groups(w, group, 128), bias, group)
    else:
        log.warning("%s: %d-bit weights in groups of %d have no int kernel here; dequantized to %s",
                    name or "a linear", w.bits, w.group_size, dtype)
        dense = nn.Linear(k, n, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(w.dequantize().to(device=device, dtype=dtype), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return dense  # in the input's own feature order: no permutation
    linear = linear.to(device)
    return linear if w.perm is None else PermutedLinear(linear, w.perm.to(device))


def repack_checkpoint_linears(model: nn.Module, int_gemm: Callable | None = None) -> int:
    """Replace every QuantizedLinear of `model` by its repacked linear, in place; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        model.set_submodule(name, repack(model.get_submodule(name), model.dtype, model.device, name, int_gemm))
    return len(names)
