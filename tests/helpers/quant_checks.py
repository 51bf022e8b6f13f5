"""Shared by the quantized-linear tests (test_quant.py) and the int_gemv kernel tests (test_int_gemv.py):
test linears, the kernels' activation quantization in torch, and running as a CPU of a given tier."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

from qwen2vl.backends.cpu import gemm
from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear
from tests.helpers.tiers import TIERS_HERE, at_tier

K = 256


def make_linear(dtype, n=96, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, n, bias=bias)
    with torch.no_grad():
        # rows of very different size, a few outliers, and groups offset from zero
        linear.weight.copy_(torch.randn(n, K, generator=g) * torch.rand(n, 1, generator=g) * 0.1)
        linear.weight[::7, ::13] *= 8
        linear.weight[::5, :64] += 0.05
        if bias:
            linear.bias.copy_(torch.randn(n, generator=g))
    return linear.to(dtype)


def quantize(kind, linear, group_size=32, blocked=None):
    """`linear` as kind int8 (per row), int4 or int8g (8 bits per group; always in the kernel's layout)."""
    if kind == "int8":
        return Int8Linear.from_linear(linear, blocked=blocked)
    if kind == "int8g":
        return int8_groups(linear, group_size)
    return Int4Linear.from_linear(linear, group_size, blocked=blocked)


def int8_groups(linear, group_size: int) -> Int8GroupLinear:
    """`linear` in 8-bit codes per group on GPTQ's asymmetric grid: each group's [min(w, 0), max(w, 0)]
    over the 256 codes, fp16 scales, an integer zero point (so codes reach both ends, zeros far from 128)."""
    w = linear.weight.detach().float()
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 255).clamp(min=2**-24).half().float()
    zeros = torch.round(-lo / scales).clamp(0, 255)
    codes = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, 255).to(torch.uint8).view(n, k)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return Int8GroupLinear.from_codes(codes, scales, (128 - zeros) * scales, bias, group_size)


def quantize_activations(x):
    """The kernel's recipe in torch: per row and block of 32 along k, d = max|x| / 127, xq = round(x / d).

    Returns xq [M, K/32, 32] (integers, as float64), d and the float sum of x per block [M, K/32].
    """
    xb = x.float().view(x.shape[0], -1, gemm.QK)
    d = xb.abs().amax(-1) / 127
    xq = torch.round(xb * torch.where(d > 0, 1 / d, 0)[..., None])  # 1 / d in float32, as the kernel
    return xq.double(), d.double(), xb.double().sum(-1)


def per_block(q, t):
    """Per-group [N, K/group] -> per activation block [N, K/32]."""
    return t.double().repeat_interleave(q.group_size // gemm.QK, 1)


KERNEL_TIERS = [t for t in TIERS_HERE if t != "none"]  # int_gemv has variants for avx2 and up


@contextlib.contextmanager
def kernel_at(tier: str):
    """Run as a CPU of `tier`, skipping where int_gemv can't be had there; modules built inside take
    that tier's layout and kernel."""
    with at_tier(tier):
        if gemm.int_library() is None:
            pytest.skip(f"no C compiler, or no int_gemv variant at tier {tier}")
        yield
