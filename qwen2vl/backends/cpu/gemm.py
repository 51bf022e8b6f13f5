"""The CPU GEMM kernels' Python side: loading them, their AMX checks, and the calls into bf16_gemm.c,
bf16w_gemm.c and int_gemv.c (the weights in packing.py's layouts).

`bf16_gemm.c` multiplies bf16 weights by bf16 activations with AVX-512 BF16 dot products, in
its own blocked weight layout (`packing.pack_bf16`): FastLinear's path on CPUs that have them.
`bf16w_gemm.c` takes the same packed weights on CPUs without AVX-512 BF16 (AVX2 + FMA), widening
them to fp32 in registers; its activations are bf16 or float32.
`int_gemv.c` multiplies int8 (a scale per row or per group) or int4 weights by activations quantized
to int8 on the fly, with
AVX-512 VNNI integer dot products (its header gives the formulas and the weight layouts, which
`packing.pack_int8` / `pack_int4` produce); without AVX-512 `int_gemv_avx2.c` does the same with
AVX2's vpmaddubsw, with the same results bit for bit. Where bf16_gemm's AMX tiles are on, that
kernel's `bf16_gemm_codes` takes the same codes for bf16 calls of AMX_CODES_ROWS[kind] rows and more
(csrc/amx_codes.h). native.py builds and loads the variant for this CPU's tier.

`int_library()` / `bf16_library()` / `bf16w_library()` are None where a kernel can't be had (no
compiler, a failed compile, a CPU without the features); native.py logs why, once, and the caller
keeps torch's kernels (backends/quant.py: torch's weight-only ones;
backends/cpu/linear.py: oneDNN).
"""

from __future__ import annotations

import logging
import os

import torch

from qwen2vl.backends.cpu import native
from qwen2vl.backends.cpu.packing import pack_bf16
from qwen2vl.backends.cpu.untraced import untraced

log = logging.getLogger(__name__)

QK = 32  # the kernel quantizes activations per block of 32 along k, so K must be a multiple


def int_library():
    """The loaded int_gemv kernel, or None where it can't be built or run here."""
    return native.library("int_gemv")


AMX_ENV = "QWEN2VL_AMX"


def bf16_library():
    """The loaded bf16_gemm kernel, or None where it can't be built or run here.

    Its AMX variant's tiles serve calls of more than 8 rows (prefill, the vision tower, batched
    decode) where the CPU has them, switched on at first use if they pass `amx_check` (`lib.amx` says); $QWEN2VL_AMX=0
    keeps them off. On a 2-vCPU Xeon they ran the 2B's prefill shapes 8-9x faster than the AVX-512
    BF16 tiles (as fast as oneDNN's) and the time to first token 5.4x (docs/performance.md). They
    sum in another order than the AVX-512 tiles, so a row's output in a call of more than 8 rows
    differs in the last bits from the same row among 5-8 (as rows 1-4, streamed, already differ
    from 5 and more)."""
    lib = native.library("bf16_gemm")
    if lib is not None and not hasattr(lib, "amx"):
        lib.amx = False  # bf16_gemm below runs the AVX-512 tiles until the check passes
        if "amx_bf16" in lib.variant[1] and os.environ.get(AMX_ENV) != "0":
            lib.amx = amx_check(lib)
    return lib


def amx_check(lib) -> bool:
    """Switch the AMX tiles on if Linux grants their state and they compute a product with a row tail
    and an odd block count within a float32 sum of float64 (bf16_amx.h was written without an AMX
    machine at hand: a wrong result switches it off, logged, rather than serving wrong logits)."""
    if not lib.bf16_gemm_amx(1):
        log.warning("bf16_gemm: Linux refused the AMX tile state; prefill uses the AVX-512 tiles")
        return False
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(37, 96, generator=g).bfloat16()
    bias = torch.randn(40, generator=g).bfloat16()
    y = bf16_gemm(x, pack_bf16(w, huge_pages=False), bias, 40).double()
    ref = x.double() @ w.double().t() + bias.double()
    bound = 2**-8 * ref.abs() + 96 * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    if not ((y - ref).abs() <= bound).all():
        lib.bf16_gemm_amx(0)
        log.warning("bf16_gemm: the AMX tiles failed their check (max error %.3g); prefill uses the AVX-512 tiles",
                    (y - ref).abs().max())
        return False
    return True


def bf16w_library():
    """The loaded bf16w_gemm kernel (bf16 weights, fp32 arithmetic, AVX2), or None where it can't be had."""
    return native.library("bf16w_gemm")


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel can take activations like `x` (it reads and writes fp32 or bf16)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and int_library() is not None


INT8, INT4, INT8G = 1, 2, 4  # int_gemv's weight kinds (kernels.h's enum)
# From this many rows (per weight kind) a bf16 call of a quantized model runs on the AMX bf16 tiles
# (bf16_gemm_codes: the codes widened to bf16 a chunk at a time) where they are on, else int_gemv. Measured
# on a 2-vCPU Xeon (docs/performance.md, AMX tier): the calls alone (python -m benchmarks.cpu_gemm_tier --part
# codes) are ahead from 32 rows for every kind; whole decode steps of 32 requests (python -m
# benchmarks.quant_decode --batch 32) were for int4 (1.20x) and not for int8 (0.95x), 64 for both (1.13x, 1.39x).
AMX_CODES_ROWS = {INT8: 64, INT4: 32, INT8G: 32}


def int8_gemm(x, weight, scales, bias, out_features: int) -> torch.Tensor:
    """x [M, K] times pack_int8 weights with per-row `scales` [N padded], plus bias: [M, out_features]."""
    return _call(INT8, x, weight, scales, bias, out_features, QK)


def int4_gemm(x, packed, scales_zeros, bias, out_features: int, group_size: int) -> torch.Tensor:
    """x [M, K] times pack_int4 weights with pack_groups scales and zeros, plus bias: [M, out_features]."""
    return _call(INT4, x, packed, scales_zeros, bias, out_features, group_size)


def int8g_gemm(x, weight, scales_zeros, bias, out_features: int, group_size: int) -> torch.Tensor:
    """x [M, K] times pack_int8 codes with pack_groups scales and zeros (w = (code - 128) * s + z per
    group), plus bias: [M, out_features]."""
    return _call(INT8G, x, weight, scales_zeros, bias, out_features, group_size)


def amx_codes_library():
    """The bf16_gemm kernel where its AMX tiles are on (they take a quantized model's bf16 calls of
    AMX_CODES_ROWS rows or more, per kind), else None."""
    lib = bf16_library()
    return lib if lib is not None and lib.amx else None


@untraced  # a ctypes call: dynamo can't trace it
def _call(kind, x, weight, scales, bias, n, group) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    assert k % QK == 0 and weight.is_contiguous() and scales.is_contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = torch.empty(m, n, dtype=x.dtype)
    if m == 0:  # nothing to compute (and malloc(0) may return NULL)
        return y
    bf16 = x.dtype == torch.bfloat16
    args = (weight.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16, x.data_ptr(), y.data_ptr(),
            None if bias is None else bias.data_ptr())
    threads = torch.get_num_threads()
    if bf16 and m >= AMX_CODES_ROWS[kind] and (amx := amx_codes_library()) is not None:
        if amx.bf16_gemm_codes(kind, *args, m, n, k, group, threads) == 0:
            return y
    lib = int_library()
    fn = {INT8: lib.int8_gemm, INT4: lib.int4_gemm, INT8G: lib.int8g_gemm}[kind]
    rc = fn(*args, bf16, m, n, k, threads) if kind == INT8 else fn(*args, bf16, m, n, k, group, threads)
    if rc != 0:
        raise MemoryError("int_gemv: out of memory for the quantized activations")
    return y


@untraced  # a ctypes call: dynamo can't trace it
def bf16_gemm(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """bf16 x [M, K] times pack_bf16 weights, plus bf16 bias: bf16 [M, out_features]."""
    x = x.contiguous()
    m, k = x.shape
    assert x.dtype == torch.bfloat16 and packed.shape[1] * 2 == k and packed.is_contiguous()
    y = torch.empty(m, out_features, dtype=torch.bfloat16)
    if m:
        bf16_library().bf16_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(),
                                 None if bias is None else bias.data_ptr(), m, out_features, k,
                                 torch.get_num_threads())
    return y


@untraced  # a ctypes call: dynamo can't trace it
def bf16w_gemm(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [M, K] (bf16 or float32) times pack_bf16 weights in fp32 arithmetic, plus bias (read as bf16):
    [M, out_features] in x's dtype. For CPUs without AVX-512 BF16 (bf16w_gemm.c)."""
    x = x.contiguous()
    m, k = x.shape
    assert x.dtype in (torch.bfloat16, torch.float32) and packed.shape[1] * 2 == k and packed.is_contiguous()
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        bias = bias.to(torch.bfloat16).contiguous()
    y = torch.empty(m, out_features, dtype=x.dtype)
    if m and bf16w_library().bf16w_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(),
                                        None if bias is None else bias.data_ptr(), x.dtype == torch.bfloat16,
                                        m, out_features, k, torch.get_num_threads()):
        raise MemoryError("bf16w_gemm: out of memory for the float32 copy of x")
    return y
