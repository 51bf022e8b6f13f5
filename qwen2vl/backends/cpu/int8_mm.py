"""W8A8 for many rows: the Python side of csrc/int8_mm.c.

Prefill and the vision tower multiply hundreds of rows by each weight, so they are compute-bound;
below AVX-512 BF16 they run in float32 FMAs (bf16w_gemm.c at about the AVX2 FMA peak). int8 dot
products do about twice the work per instruction at AVX2 (vpmaddubsw + vpmaddwd) and four times at
AVX-512 VNNI (vpdpbusd). The weights are pack_int8's codes (the quantized models' own, or a copy
quantized at load); each call quantizes its activations per row (token), symmetric, and sums the
products exactly in int32, so a row's output depends on that row alone (csrc/int8_mm.c has the
formula). `Int8RowsLinear` puts it under the linears where the compute-dtype policy asks for int8
(`LLM(..., matmul="int8")`, backend.py).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.cpu import gemm, native, packing
from qwen2vl.backends.cpu.untraced import untraced
from qwen2vl.backends.quant import Int8Linear

log = logging.getLogger(__name__)

# |dot| <= 255 * 127 * K (the VNNI build sums codes in [0, 255]) must stay below 2**31
MAX_K = 65536


def library():
    """The loaded int8_mm kernel (AMX, AVX-512 VNNI or AVX2 build), or None where it can't be had.

    The AMX build's tiles go on at first use unless $QWEN2VL_AMX=0 (`lib.amx` says), if Linux grants
    their state and they give the VNNI tile's bits on a checked product: on a 2-vCPU Xeon they ran
    the 2B's prefill shapes ~2x faster than the VNNI tile (docs/performance.md)."""
    lib = native.library("int8_mm")
    if lib is not None and not hasattr(lib, "amx"):
        lib.amx = False
        if "amx_int8" in lib.variant[1] and os.environ.get(gemm.AMX_ENV) != "0":
            lib.amx = amx_check(lib)
    return lib


def amx_check(lib) -> bool:
    """Switch the AMX tiles on if Linux grants their state and a product with row and column tails
    equals the VNNI tile's, bit for bit (both sum exactly in int32); else leave them off, logged."""
    if not lib.int8_mm_amx(1):
        log.warning("int8_mm: Linux refused the AMX tile state; the VNNI tile runs")
        return False
    g = torch.Generator().manual_seed(0)
    weight = packing.pack_int8(torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=g), huge_pages=False)
    scales = torch.rand(48, generator=g) / 100
    x, bias = torch.randn(37, 128, generator=g), torch.randn(40, generator=g)
    tiles = int8_mm(x, weight, scales, bias, 40)
    lib.int8_mm_amx(0)
    vnni = int8_mm(x, weight, scales, bias, 40)
    if not torch.equal(tiles, vnni):
        log.warning("int8_mm: the AMX tiles' product differs from the VNNI tile's; the VNNI tile runs")
        return False
    lib.int8_mm_amx(1)
    return True


def takes(x: torch.Tensor) -> bool:
    """Whether the kernel can take activations like `x` here (CPU, bf16 or float32, kernel built)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and library() is not None


@untraced  # a ctypes call: dynamo can't trace it
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
    """x [M, K] (bf16 or float32) times pack_int8 codes `weight` [N/16, K/4, 16, 4] with per-channel
    `scales` [N padded to 16] (bf16 or float32), plus bias: [M, out_features] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"int8_mm: in_features {k} is over the int32 sums' limit of {MAX_K}")
    assert k % 4 == 0 and weight.shape[1] * 4 == k and weight.is_contiguous() and scales.is_contiguous()
    assert scales.numel() >= weight.shape[0] * 16 and scales.dtype in (torch.bfloat16, torch.float32)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = torch.empty(m, out_features, dtype=x.dtype)
    if m and library().int8_mm(weight.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16, x.data_ptr(),
                               y.data_ptr(), None if bias is None else bias.data_ptr(), x.dtype == torch.bfloat16,
                               m, out_features, k, torch.get_num_threads()):
        raise MemoryError("int8_mm: out of memory for the quantized activations")
    return y


SMALL_ROWS = 4  # calls of up to this many rows (decode) go to the linear int8_mm stands beside


class Int8RowsLinear(nn.Module):
    """A linear whose calls of more than SMALL_ROWS rows run int8_mm on int8 codes (pack_int8's layout,
    a scale per output channel). Smaller calls, decode's, run `small`, the linear it was built beside:
    a bf16 model's FastLinear (decode keeps streaming its bf16 weights), or an int8 model's own
    Int8Linear, whose codes it shares. Without `small` (the vision tower) every call is int8_mm."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                 in_features: int, small: nn.Module | None = None):
        super().__init__()
        self.weight, self.scales = weight, scales  # shared with `small` when it is an Int8Linear: no buffers
        self.bias = bias
        self.out_features, self.in_features = out_features, in_features
        self.small = small

    @classmethod
    def quantize(cls, linear: nn.Linear, small: nn.Module | None = None) -> Int8RowsLinear:
        """Codes quantized from `linear`'s weight, symmetric per output channel (as Int8Linear's)."""
        q = Int8Linear.from_linear(linear, blocked=True, huge_pages=False)  # compute-bound calls only
        return cls(q.weight, q.scales, q.bias, q.out_features, q.in_features, small)

    @classmethod
    def beside(cls, q: Int8Linear) -> Int8RowsLinear:
        """Over an int8 model's blocked Int8Linear, sharing its codes and scales."""
        return cls(q.weight, q.scales, q.bias, q.out_features, q.in_features, small=q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.small is not None and x2.shape[0] <= SMALL_ROWS:
            return self.small(x)
        if takes(x):
            return int8_mm(x2, self.weight, self.scales, self.bias, self.out_features).view(*x.shape[:-1], -1)
        if self.small is not None:
            return self.small(x)
        w = packing.unpack_int8(self.weight)[: self.out_features].to(x.dtype) * self.scales[: self.out_features, None]
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, int8_mm above "
                f"{SMALL_ROWS} rows")


def use_int8_matmuls(model: nn.Module, small=None) -> int:
    """Put int8_mm under the matmul-heavy linears of `model` in place; returns how many.

    `small(linear)`: the module for decode rows next to each nn.Linear (None: int8_mm for every call,
    as the vision tower wants); blocked Int8Linears (a quantized model's) get one sharing their codes.
    lm_head is left out: prefill asks it for one row per sequence.
    """
    names = [name for name, module in model.named_modules()
             if (type(module) is nn.Linear or (isinstance(module, Int8Linear) and module.blocked))
             and not name.startswith("lm_head")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = (Int8RowsLinear.beside(old) if isinstance(old, Int8Linear) else
               Int8RowsLinear.quantize(old, None if small is None else small(old)))
        setattr(parent, child, new)
    return len(names)
