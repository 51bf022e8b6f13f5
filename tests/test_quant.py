"""Weight-only int8/int4 linears: error within the quantization step, kernels equal the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qwen2vl.quant as quant
from qwen2vl.quant import Int4Linear, Int8Linear, pack_int4, quantize_model, unpack_int4

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


def quantize(kind, linear, group_size=32):
    return Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, group_size)


def max_weight_error(q) -> torch.Tensor:
    """Per-weight bound [N, K]: half a quantization step, plus (int4) the rounding of the stored zero."""
    if isinstance(q, Int8Linear):
        return q.scales.float()[:, None].expand(q.out_features, K) * 0.5
    sz = q.scales_zeros[:, : q.out_features].float().repeat_interleave(q.group_size, 0).transpose(0, 1)
    eps = torch.finfo(q.scales_zeros.dtype).eps
    return sz[..., 0] * (0.5 + 1e-5) + sz[..., 1].abs() * eps / 2


def test_int4_layout_round_trips_and_matches_the_kernel_packer():
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        assert quant.has_int4_kernel()  # our packer produces exactly the kernel's layout
    assert quant.has_int8_kernel()


@pytest.mark.parametrize("kind,group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 97])
def test_dequantized_weights_within_half_a_step(kind, group_size, dtype, n):
    linear = make_linear(dtype, n)
    q = quantize(kind, linear, group_size)
    err = (q.dequantize(torch.float32) - linear.weight.float()).abs()
    bound = max_weight_error(q)
    assert (err <= bound).all(), (err / bound).max()
    assert err.mean() > 0.1 * bound.mean()  # really quantized, not stored as is


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_output_error_bounded_by_step(kind, rows, dtype, bias):
    linear = make_linear(dtype, bias=bias)
    q = quantize(kind, linear)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
    assert y.dtype == dtype and y.shape == ref.shape
    # |sum_k (w - w_q) x| <= sum_k bound_k |x_k|, plus one output rounding (and bf16 dequantized weights)
    eps = torch.finfo(dtype).eps
    bound = (x.double().abs() @ (max_weight_error(q).double() + eps * linear.weight.double().abs()).t()
             + eps * ref.abs() + 1e-6)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n", [96, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_dequantize_fallback(kind, rows, n, dtype, monkeypatch):
    linear = make_linear(dtype, n)
    q = quantize(kind, linear)
    x = torch.randn(2, rows, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        y_kernel = q(x).double()
        monkeypatch.setattr(quant, f"has_{kind}_kernel", lambda: False)  # as if the kernel were missing
        y_fallback = q(x).double()
    assert y_kernel.shape == (2, rows, n)
    # both accumulate in float32; in bf16 the fallback also rounds the dequantized weights (2^-9)
    # and each rounds its output once (2^-8)
    scale = x.double().abs() @ q.dequantize(torch.float64).abs().t()
    tol = 1e-5 * scale if dtype == torch.float32 else 2**-9 * scale + 2**-7 * y_fallback.abs()
    assert ((y_kernel - y_fallback).abs() <= tol).all()


def test_quantize_model_skips_vision_and_optionally_head():
    def model():
        m = nn.Module()
        m.visual = nn.Sequential(nn.Linear(64, 64))
        m.layers = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 32, bias=False)])
        m.lm_head = nn.Linear(64, 100, bias=False)
        return m

    m = model()
    assert quantize_model(m, "int4", group_size=32) == 3
    assert type(m.visual[0]) is nn.Linear and isinstance(m.lm_head, Int4Linear)
    m = model()
    assert quantize_model(m, "int8", include_head=False) == 2
    assert type(m.lm_head) is nn.Linear and all(isinstance(x, Int8Linear) for x in m.layers)
    with pytest.raises(ValueError, match="int8"):
        quantize_model(model(), "fp8")
    with pytest.raises(ValueError, match="groups"):
        Int4Linear.from_linear(nn.Linear(48, 64), group_size=32)
