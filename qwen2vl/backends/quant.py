"""Weight-only int8 and int4 linears, swapped in after loading (`quantize_model`).

Decode streams every weight once per token, so fewer bytes per weight is more tokens per second:
int8 is 1 byte (+ a scale per output row), int4 half a byte (+ a scale and a zero point per group
of 32-256 weights).

- Int8Linear: symmetric per output channel, w = q * scale, q in [-127, 127].
- Int4Linear: asymmetric per group along k, w = (q - 8) * scale + zero, q in [0, 15].

Kernels, one per module, picked when it is built:
- ours, qwen2vl/backends/cpu/csrc/int_gemv.c, on CPUs with AVX-512 VNNI and a C compiler: the activations
  are quantized to int8 per block of 32 on the fly and the dot products run in integer VNNI
  instructions, which keeps decode memory-bound (torch's kernels below convert every weight to
  float and are compute-bound on a few cores: docs/performance.md). The weights are stored only
  in its blocked layout (`blocked` is True). Where the CPU's AMX tiles are on, bf16 calls of
  gemm.AMX_CODES_ROWS rows and more (prefill, large decode batches) run on them instead, the codes widened to bf16.
- elsewhere torch's CPU weight-only kernels, `aten._weight_int8pack_mm` and
  `aten._weight_int4pack_mm_for_cpu`, on weights in their layouts.
Dequantize + F.linear is the fallback on other devices (and for fp16 activations); the tests
check all three agree.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.cpu import gemm, packing
from qwen2vl.backends.swap import replace_linears

INT4_BLOCK_N = 64  # the CPU int4 kernel's layout packs output channels in blocks of 64


def _round(t: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """`t` stored in `dtype`, rounded up (or down) so the quantized range still covers the weights."""
    r = t.to(dtype)
    off = r.float() < t if up else r.float() > t
    return torch.where(off, torch.nextafter(r, torch.full_like(r, float("inf") if up else float("-inf"))), r)


def pack_torch_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 (N a multiple of 64) -> uint8 [N, K/2] in torch's CPU int4 kernel's layout
    (`_weight_int4pack_mm_for_cpu` on AVX-512 ATen; our own kernel's layout is packing.pack_int4).

    The layout is [N/64, K, 32] bytes: byte j of (block b, column k) holds output channel
    64b + j in its low nibble and 64b + 32 + j in its high nibble.
    """
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, k).permute(0, 3, 1, 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).contiguous().view(n, k // 2)


def unpack_torch_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_torch_int4: uint8 [N, K/2] -> codes [N, K] (uint8)."""
    n, half = packed.shape
    p = packed.view(n // INT4_BLOCK_N, 2 * half, INT4_BLOCK_N // 2)  # [N/64, K, 32]
    return torch.stack([p & 15, p >> 4], dim=1).permute(0, 1, 3, 2).reshape(n, 2 * half)


@functools.cache
def has_int8_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.cache
def has_int4_kernel() -> bool:
    """The CPU int4 kernel exists and takes pack_torch_int4's layout (checked against its own packer)."""
    try:
        codes = torch.randint(0, 16, (2 * INT4_BLOCK_N, 64), generator=torch.Generator().manual_seed(0))
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(theirs, pack_torch_int4(codes))


def use_int_gemv(weight: torch.Tensor) -> bool:
    """Whether the quantized copy of `weight` [N, K] should be stored for our VNNI kernel."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.shape[1] % gemm.QK == 0 and gemm.int_library() is not None)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K] in [-127, 127], scales [N] in weight's dtype), w ~ q * scale.
    Symmetric per row: the largest |w| of a row maps to 127 (or just under: the scale is rounded up
    to the dtype). pack.c's quantize_int8 computes the same bits straight into the blocked layout."""
    w = weight.float()
    scales = _round(w.abs().amax(1).clamp(min=1e-8) / 127, weight.dtype, up=True)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, weight, scales, bias, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [N, K], or blocked: uint8 [N/16, K/4, 16, 4]
        self.register_buffer("scales", scales)  # [N] (blocked: padded to 16), model dtype
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = out_features, in_features
        self.blocked = weight.dim() == 4  # stored in int_gemv's layout, for our kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocked: bool | None = None, huge_pages: bool = True) -> Int8Linear:
        """Quantized per output channel (quantize_int8_rows); `huge_pages=False` for codes that decode
        doesn't stream (packing.empty_huge)."""
        blocked = use_int_gemv(linear.weight) if blocked is None else blocked
        bias = None if linear.bias is None else linear.bias.detach().clone()
        # the blocked layout straight from C in one pass (the torch code below takes ~8 over float32 copies)
        packed = packing.quantize_int8(linear.weight.detach(), huge_pages) if blocked else None
        if packed is not None:
            return cls(*packed, bias, *linear.weight.shape)
        return cls.from_codes(*quantize_int8_rows(linear.weight.detach()), bias, blocked, huge_pages)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, bias, blocked: bool,
                   huge_pages: bool = True) -> Int8Linear:
        """From q, int8 [N, K] in [-127, 127], and per-row scales [N] (w = q * scale), as they are."""
        n, k = q.shape
        if blocked:
            q, scales = (packing.pad_rows(t, packing.ROWS) for t in (q, scales))
            q = packing.pack_int8(q, huge_pages)
        return cls(q, scales, bias, n, k)

    def codes(self) -> torch.Tensor:
        """q, int8 [N, K]."""
        return packing.unpack_int8(self.weight)[: self.out_features] if self.blocked else self.weight

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        scales = self.scales[: self.out_features].float()
        return (self.codes().float() * scales[:, None]).to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.blocked and gemm.supports(x):
            y = gemm.int8_gemm(x2, self.weight, self.scales, self.bias, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if not self.blocked and x.device.type == "cpu" and has_int8_kernel():
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"{'int_gemv' if self.blocked else 'torch'} layout")


class Int4Linear(nn.Module):
    def __init__(self, packed, scales_zeros, bias, out_features: int, in_features: int, group_size: int):
        super().__init__()
        # blocked: uint8 [N/16, K/8, 16, 4] and [N/16, K/group, 2, 16];
        # else uint8 [N padded to 64, K/2] in pack_torch_int4's layout and [K/group, N padded, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)  # model dtype
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = out_features, in_features
        self.group_size = group_size
        self.blocked = packed.dim() == 4  # stored in int_gemv's layout, for our kernel

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32, blocked: bool | None = None) -> Int4Linear:
        n, k = linear.weight.shape
        if k % group_size or group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 groups of {group_size} don't tile in_features={k}")
        blocked = use_int_gemv(linear.weight) if blocked is None else blocked
        # zero rows up to the kernel's block
        w = packing.pad_rows(linear.weight.detach().float(), packing.ROWS if blocked else INT4_BLOCK_N)
        w = w.view(-1, k // group_size, group_size)
        lo, hi, dtype = w.amin(-1), w.amax(-1), linear.weight.dtype
        # 16 levels span each group; the zero sits on level 8 and is stored in the model dtype
        scales = _round(((hi - lo) / 15).clamp(min=1e-8), dtype, up=True)
        zeros = (lo + 8 * scales.float()).to(dtype)
        q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15).view(-1, k)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_codes(q[:n], scales[:n], zeros[:n], bias, group_size, blocked)

    @classmethod
    def from_codes(cls, codes, scales, zeros, bias, group_size: int, blocked: bool) -> Int4Linear:
        """From codes [N, K] in 0..15 and per-group scales and zeros [N, K/group] (w = (q - 8) * s + z),
        stored in the dtype they come in."""
        n, k = codes.shape
        rows = packing.ROWS if blocked else INT4_BLOCK_N
        codes, scales, zeros = (packing.pad_rows(t, rows) for t in (codes, scales, zeros))
        if blocked:
            return cls(packing.pack_int4(codes), packing.pack_groups(scales, zeros), bias, n, k, group_size)
        scales_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
        return cls(pack_torch_int4(codes), scales_zeros, bias, n, k, group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes [N, K] (uint8), scales and zeros [N, K/group]."""
        if self.blocked:
            codes, (scales, zeros) = packing.unpack_int4(self.packed), packing.unpack_groups(self.scales_zeros)
        else:
            codes, (scales, zeros) = unpack_torch_int4(self.packed), self.scales_zeros.permute(2, 1, 0)
        n = self.out_features
        return codes[:n], scales[:n], zeros[:n]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes, scales, zeros = self.unpack()
        per_weight = lambda t: t.float().repeat_interleave(self.group_size, 1)
        w = (codes.float() - 8) * per_weight(scales) + per_weight(zeros)
        return w.to(dtype or self.scales_zeros.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.blocked and gemm.supports(x):
            y = gemm.int4_gemm(x2, self.packed, self.scales_zeros, self.bias, self.out_features, self.group_size)
            return y.view(*x.shape[:-1], self.out_features)
        if not self.blocked and x.device.type == "cpu" and has_int4_kernel():
            sz = self.scales_zeros.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size, sz)
            y = y[:, : self.out_features]
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"bias={self.bias is not None}, {'int_gemv' if self.blocked else 'torch'} layout")


# what LLM(quantization=...) and `serve --quantization` accept: (mode, int4 group size). Groups of
# 32 are llama.cpp's Q4_0 choice; 128 streams 15% fewer bytes (3.7x bf16's decode linears vs 3.2x
# for 32) at about twice the error (docs/performance.md).
QUANTIZATIONS = {"int8": ("int8", 32), "int4": ("int4", 32), "int4-g64": ("int4", 64), "int4-g128": ("int4", 128)}


def quantize_model(
    model: nn.Module, mode: str, group_size: int = 32, skip: tuple[str, ...] = ("visual",),
    include_head: bool = True,
) -> int:
    """Replace the nn.Linear modules of `model` by Int8Linear or Int4Linear in place; returns the count.

    `skip`: qualified-name prefixes left in full precision (the vision tower by default: it runs
    once per image with many rows, so it is compute-bound and quantizing it only costs accuracy).
    `include_head=False` keeps lm_head too. A tied head is quantized into its own copy; the
    embedding keeps the full-precision table.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"quantization mode must be 'int8' or 'int4', not {mode!r}")
    if not include_head:
        skip = (*skip, "lm_head")
    if mode == "int8":
        return replace_linears(model, lambda name, linear: Int8Linear.from_linear(linear), skip)
    return replace_linears(model, lambda name, linear: Int4Linear.from_linear(linear, group_size), skip)
