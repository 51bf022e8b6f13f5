"""int8/int4 linears: error within the quantization step, with torch's kernels and with ours at every
tier this machine can play; torch's kernels equal the dequantize fallback. Our kernel alone:
test_int_gemv.py."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qwen2vl.backends.quant as quant
from qwen2vl.backends.cpu import gemm, isa, native, packing
from qwen2vl.backends.quant import Int4Linear, Int8Linear, pack_torch_int4, quantize_model, unpack_torch_int4
from tests.helpers.quant_checks import (
    KERNEL_TIERS,
    K,
    kernel_at,
    make_linear,
    per_block,
    quantize,
    quantize_activations,
)


def max_weight_error(q) -> torch.Tensor:
    """Per-weight bound [N, K]: half a quantization step, plus (int4) the rounding of the stored zero."""
    if isinstance(q, Int8Linear):
        return q.scales[: q.out_features].float()[:, None].expand(q.out_features, K) * 0.5
    _, scales, zeros = q.unpack()
    eps = torch.finfo(q.scales_zeros.dtype).eps
    return (scales.float() * (0.5 + 1e-5) + zeros.float().abs() * eps / 2).repeat_interleave(q.group_size, 1)


def test_layouts_round_trip_and_torch_int4_layout_matches_its_packer():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_torch_int4(pack_torch_int4(codes)), codes)
    assert torch.equal(packing.unpack_int4(packing.pack_int4(codes)), codes)
    q = torch.randint(-127, 128, (128, 64), generator=g, dtype=torch.int8)
    assert torch.equal(packing.unpack_int8(packing.pack_int8(q)), q)
    scales, zeros = torch.randn(2, 128, 2, generator=g)
    assert all(map(torch.equal, packing.unpack_groups(packing.pack_groups(scales, zeros)), (scales, zeros)))
    # int_gemv's int4 layout: byte j of a 64-byte chunk is row j // 4, k = j % 4 (low) and 4 + j % 4 (high)
    assert packing.pack_int4(codes)[0, 0, 1, 2] == codes[1, 2] | codes[1, 6] << 4
    # our packer produces exactly the layout torch's kernel takes on AVX-512 ATen (on AVX2 its layout
    # differs, and it is ~1000x too slow to want: Int4Linear dequantizes there when our kernel is missing)
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and \
            torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert quant.has_int4_kernel()
    assert quant.has_int8_kernel()


@pytest.mark.parametrize("kind,group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 97])
@pytest.mark.parametrize("blocked", [True, False])  # int_gemv's layout, torch's
def test_dequantized_weights_within_half_a_step(kind, group_size, dtype, n, blocked):
    linear = make_linear(dtype, n)
    q = quantize(kind, linear, group_size, blocked)
    assert q.blocked == blocked
    err = (q.dequantize(torch.float32) - linear.weight.float()).abs()
    bound = max_weight_error(q)
    assert (err <= bound).all(), (err / bound).max()
    assert err.mean() > 0.1 * bound.mean()  # really quantized, not stored as is


def activation_error(q, x):
    """Bound on what quantizing x costs: half a step (d / 2) per element times the |w| it multiplies
    (for int4, only the (q - 8) * scale part: the zero point meets the exact sum of x)."""
    _, d, _ = quantize_activations(x)
    if isinstance(q, Int8Linear):
        w = q.dequantize(torch.float64)
    else:
        codes, scales, _ = q.unpack()
        w = (codes.double() - 8) * per_block(q, scales).repeat_interleave(gemm.QK, 1)
    return (d.repeat_interleave(gemm.QK, 1) / 2) @ w.abs().t()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["torch", *KERNEL_TIERS])  # torch's kernels, or ours at a tier
def test_output_error_bounded_by_step(kind, rows, dtype, bias, path):
    blocked = path != "torch"
    with kernel_at(path) if blocked else contextlib.nullcontext():
        linear = make_linear(dtype, bias=bias)
        q = quantize(kind, linear, blocked=blocked)
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
        with torch.no_grad():
            y = q(x)
    ref = F.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
    assert y.dtype == dtype and y.shape == ref.shape
    # |sum_k (w - w_q) x| <= sum_k bound_k |x_k|, plus one output rounding (and bf16 dequantized weights)
    eps = torch.finfo(dtype).eps
    bound = (x.double().abs() @ (max_weight_error(q).double() + eps * linear.weight.double().abs()).t()
             + eps * ref.abs() + 1e-6)
    if blocked:
        bound += activation_error(q, x)
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("n", [96, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_kernel_equals_dequantize_fallback(kind, rows, n, dtype, monkeypatch):
    linear = make_linear(dtype, n)
    q = quantize(kind, linear, blocked=False)
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


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_without_int_gemv_modules_take_torch_layouts_and_blocked_ones_dequantize(kind, monkeypatch):
    linear = make_linear(torch.float32, 97)
    blocked = quantize(kind, linear, blocked=True)
    assert not Int8Linear.from_linear(nn.Linear(48, 16)).blocked  # in_features not a multiple of 32
    monkeypatch.setattr(gemm, "int_library", lambda: None)  # no compiler, or no VNNI
    assert not quantize(kind, linear).blocked
    x = torch.randn(3, K)
    with torch.no_grad():
        y = blocked(x)  # a blocked module where the kernel is missing: dequantize + F.linear
    ref = x.double() @ blocked.dequantize(torch.float64).t() + linear.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_build_problems_fall_back_and_log_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cases = [(None, "none", "no variant for this CPU", logging.INFO)]  # capped below every variant
    if native.variant("int_gemv") is not None:  # the variants this CPU would build: each build can fail
        for source, _ in native.variants("int_gemv"):  # (a failed one gives way to the next: tests/test_native.py)
            (tmp_path / source).write_text("int int8_gemm(void) { return }\n")
        cases += [("CC", "/nonexistent/cc", "unavailable", logging.WARNING),
                  ("CSRC", tmp_path, "compile failed", logging.WARNING)]
    try:
        for attr, value, message, level in cases:
            with monkeypatch.context() as m, caplog.at_level(level, logger="qwen2vl.backends.cpu.native"):
                if attr is None:
                    m.setenv(isa.ENV, value)
                else:
                    m.setattr(native, attr, value)
                isa.current.cache_clear()
                native.library.cache_clear()
                assert gemm.int_library() is None and gemm.int_library() is None
            assert caplog.text.count(message) == 1, caplog.text
            caplog.clear()
    finally:
        isa.current.cache_clear()
        native.library.cache_clear()


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
