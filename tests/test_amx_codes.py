"""A quantized model's bf16 calls of gemm.AMX_CODES_ROWS rows and more on the AMX bf16 tiles (amx_codes.h:
int_gemv's codes widened to bf16 a chunk at a time), where the CPU has AMX: equal to x times the module's
weights in bf16 (INT8's exact codes with the row scale on the sums; the grouped kinds' weights rounded to
bf16 once, as dequantize rounds them), with no activation quantization; fewer rows, float32 x and other
tiers keep int_gemv."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.cpu import gemm
from qwen2vl.backends.quant import Int8Linear
from tests.helpers.quant_checks import K, kernel_at, make_linear, quantize
from tests.helpers.tiers import TIERS_HERE


@pytest.fixture
def amx():
    if "amx" not in TIERS_HERE:
        pytest.skip("needs a CPU with AMX")
    with kernel_at("amx"):
        if gemm.amx_codes_library() is None:
            pytest.skip("the AMX bf16 tiles are not on here")
        yield


def bf16_weights(q) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (w [N, K], a per-row factor [N]) the tiles multiply by: INT8's exact codes and its scales; the
    grouped kinds' weights rounded to bf16 and 1."""
    n = q.out_features
    if isinstance(q, Int8Linear):
        return q.codes().double(), q.scales[:n].double()
    return q.dequantize(torch.bfloat16).double(), torch.ones(n, dtype=torch.float64)


@pytest.mark.parametrize("kind,group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 256), ("int8g", 32),
                                             ("int8g", 128)])
@pytest.mark.parametrize("rows", [64, 65, 100])  # 65, 100: the last group of 32 rows padded
@pytest.mark.parametrize("n", [96, 97, 200])  # 97: the last block padded; 200: an odd number of blocks (13)
def test_amx_codes_equal_bf16_product_of_the_module_weights(kind, group_size, rows, n, amx):
    q = quantize(kind, make_linear(torch.bfloat16, n, bias=rows % 2 == 1), group_size)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    x[0, 100] = 40  # an outlier: int_gemv's block scale would lose its neighbours, the tiles don't
    with torch.no_grad():
        y = q(x)
    w, factor = bf16_weights(q)
    sums = x.double() @ w.t()
    ref = sums * factor + (0 if q.bias is None else q.bias.double())
    # products of bf16 are exact in fp32; K = 256 fp32 additions, the factor and bias, one bf16 rounding
    size = (x.double().abs() @ w.abs().t()) * factor
    err = (y.double() - ref).abs()
    assert (err <= 1e-6 * size + torch.finfo(torch.bfloat16).eps / 2 * ref.abs()).all(), err.max()


@pytest.mark.parametrize("kind", ["int8", "int4", "int8g"])
def test_amx_codes_from_their_row_count_only_bf16(kind, amx):
    """Below AMX_CODES_ROWS[kind] rows, and for float32 x, int_gemv runs (its activation blocks differ in
    the last bits from the tiles' bf16 x): a row's output among 63 rows differs from it among 64 (int8)."""
    q = quantize(kind, make_linear(torch.bfloat16, 96, bias=True))
    rows = gemm.AMX_CODES_ROWS[{"int8": gemm.INT8, "int4": gemm.INT4, "int8g": gemm.INT8G}[kind]]
    x = torch.randn(rows, K).to(torch.bfloat16)
    with torch.no_grad():
        full, fewer = q(x), q(x[:-1])
        assert not torch.equal(full[:-1], fewer)
        assert torch.equal(q(x.float())[:-1], q(x[:-1].float()))  # int_gemv: each row's own


def test_amx_codes_fall_back_to_int_gemv_when_the_tiles_are_off(amx):
    q = quantize("int4", make_linear(torch.bfloat16, 96))
    x = torch.randn(70, K).to(torch.bfloat16)
    lib = gemm.bf16_library()
    with torch.no_grad():
        on = q(x)
        lib.bf16_gemm_amx(0)
        try:
            off = q(x)
        finally:
            lib.bf16_gemm_amx(1)
        assert torch.equal(off[:4], q(x[:4]))  # int_gemv's rows are each their own
    assert not torch.equal(on, off)
