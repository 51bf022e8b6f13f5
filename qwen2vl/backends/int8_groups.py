"""8-bit weights with a scale and a zero per group: a GPTQ-Int8 checkpoint's linears (Qwen's use groups
of 128), repacked at load by backends/repack.py.

w = (code - 128) * s_g + z_g per group g of 32..256 input features, codes 0..255: GPTQ's
w = (code - zero) * s is z = (128 - zero) * s, exact in float32 for its fp16 scales, so the weights
equal the checkpoint's whatever its zero points (symmetric, zero 128, or not). Memory: 1 byte a
weight + a float32 scale and zero per group, 8 bytes: 1.0625 bytes a weight for groups of 128 (an
Int8Linear's 1 + 4 bytes per row; bf16's 2).

Kernel: int_gemv.c's INT8G kind (`int8g_gemm`, AVX-512 VNNI or AVX2): the codes in pack_int8's
layout (as an Int8Linear's), the scales and zeros in pack_groups' (as an Int4Linear's); activations
quantized per block of 32 as for those, any number of rows. Where it can't run (no int_gemv at this
tier, fp16 activations) the reference: dequantize + F.linear, every call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.cpu import gemm, packing

GROUPS = (32, 64, 128, 256)  # whole activation blocks of 32, a power of two of them (the kernel's shift)


class Int8GroupLinear(nn.Module):
    def __init__(self, weight, scales_zeros, bias, out_features: int, in_features: int, group_size: int):
        super().__init__()
        self.register_buffer("weight", weight)  # uint8 [N/16, K/4, 16, 4]: codes, pack_int8's layout
        self.register_buffer("scales_zeros", scales_zeros)  # [N/16, K/group, 2, 16]: pack_groups' layout
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias, group_size: int) -> Int8GroupLinear:
        """From codes [N, K] in 0..255 and per-group scales and zeros [N, K/group] (w = (code - 128) * s + z),
        stored in the dtype they come in."""
        n, k = codes.shape
        if group_size not in GROUPS or k % group_size:
            raise ValueError(f"8-bit groups of {group_size} don't tile in_features={k}: groups of "
                             f"{', '.join(map(str, GROUPS))} dividing it")
        q = (codes.to(torch.int16) - 128).to(torch.int8)  # pack_int8 stores q + 128: the codes themselves
        q, scales, zeros = (packing.pad_rows(t, packing.ROWS) for t in (q, scales, zeros))
        return cls(packing.pack_int8(q), packing.pack_groups(scales, zeros), bias, n, k, group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q = code - 128, int8 [N, K]; scales and zeros [N, K/group]."""
        (scales, zeros), n = packing.unpack_groups(self.scales_zeros), self.out_features
        return packing.unpack_int8(self.weight)[:n], scales[:n], zeros[:n]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q, scales, zeros = self.unpack()
        per_weight = lambda t: t.float().repeat_interleave(self.group_size, 1)
        return (q.float() * per_weight(scales) + per_weight(zeros)).to(dtype or self.scales_zeros.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if gemm.supports(x):
            y = gemm.int8g_gemm(x2, self.weight, self.scales_zeros, self.bias, self.out_features, self.group_size)
        else:
            y = F.linear(x2, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        path = "int_gemv" if gemm.int_library() is not None else "dequantized per call"
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"bias={self.bias is not None}, {path}")
