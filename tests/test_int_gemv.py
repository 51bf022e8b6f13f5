"""Our int8/int4/grouped-int8 kernel (int_gemv.c with AVX-512 VNNI, int_gemv_avx2.c with AVX2) at every
tier this machine can play: equal to a float reference of the same quantized weights and activations, the
same whatever the rows and threads, and the two variants equal to each other bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qwen2vl.backends.cpu import gemm, native
from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear
from tests.helpers.quant_checks import (
    KERNEL_TIERS,
    K,
    kernel_at,
    make_linear,
    per_block,
    quantize,
    quantize_activations,
)


def grouped_weights(q):
    """A grouped kind's (w_q [N, K], scales, zeros) in float64, w = w_q * s + z: w_q = code - 8 (int4) or
    code - 128 (int8g, what Int8GroupLinear.unpack gives)."""
    w_q, scales, zeros = q.unpack()
    return (w_q.double() - 8 if isinstance(q, Int4Linear) else w_q.double()), scales.double(), zeros.double()


def int_gemv_reference(q, x):
    """float64 output of the kernel's formula, on the module's own codes and x quantized like the kernel."""
    xq, d, xsum = quantize_activations(x)
    n = q.out_features
    if isinstance(q, Int8Linear):  # y = scale * sum_b d_b (q . xq)_b
        w = q.codes().double() * q.scales[:n].double()[:, None]
        y = torch.einsum("mbk,nbk,mb->mn", xq, w.view(n, -1, gemm.QK), d)
    else:  # y = sum_b scale_g d_b (w_q . xq)_b + zero_g sum_b x
        w_q, scales, zeros = grouped_weights(q)
        dots = torch.einsum("mbk,nbk->mnb", xq, w_q.view(n, -1, gemm.QK))
        y = (dots * d[:, None] * per_block(q, scales)).sum(-1) + xsum @ per_block(q, zeros).t()
    return y if q.bias is None else y + q.bias.double()


def magnitude(q) -> torch.Tensor:
    """float64 [N, K]: what each weight's terms in the kernel's float sums add up to in size (a grouped
    kind's q * s and z separately: they may cancel in w)."""
    if isinstance(q, Int8Linear):
        return q.dequantize(torch.float64).abs()
    w_q, scales, zeros = grouped_weights(q)
    per_k = lambda t: t.repeat_interleave(q.group_size, 1)
    return (w_q * per_k(scales)).abs() + per_k(zeros).abs()


@pytest.fixture(params=KERNEL_TIERS)
def tier(request, monkeypatch):
    # int_gemv itself at every row count: where the AMX tiles are on they take bf16 calls of
    # gemm.AMX_CODES_ROWS rows and more (tests/test_amx_codes.py)
    monkeypatch.setattr(gemm, "AMX_CODES_ROWS", dict.fromkeys(gemm.AMX_CODES_ROWS, 1 << 30))
    with kernel_at(request.param):
        yield request.param


@pytest.mark.parametrize("kind,group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 256), ("int8g", 32),
                                             ("int8g", 128)])
# 1-4: one pass over each weight block; more: passes of 4 rows and a remainder
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("n", [96, 97])  # 97: the last block of 16 weight rows is padded
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_gemv_equals_float_reference_of_the_same_quantized_operands(kind, group_size, rows, n, dtype, tier):
    q = quantize(kind, make_linear(dtype, n, bias=rows % 2 == 1), group_size)
    assert getattr(q, "blocked", True)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
    x[..., 32:64] = 0  # a block whose scale is 0
    x[0, 100] = 40  # an outlier that sets its block's scale
    with torch.no_grad():
        y = q(x)
    ref = int_gemv_reference(q, x)
    assert y.dtype == dtype and y.shape == ref.shape
    # integer dot products are exact; the float32 sums over 8 blocks round a few times, the output once
    size = x.double().abs() @ magnitude(q).t()
    err = (y.double() - ref).abs()
    assert (err <= 1e-6 * size + torch.finfo(dtype).eps / 2 * ref.abs()).all(), err.max()


def test_grouped_int8_refuses_groups_the_kernel_cant_take():
    codes, sz = torch.zeros(16, 96, dtype=torch.uint8), torch.ones(16, 2)
    with pytest.raises(ValueError, match="8-bit groups of 48 don't tile in_features=96: groups of 32, 64, 128, 256"):
        Int8GroupLinear.from_codes(codes, sz, sz, None, 48)


def test_int_gemv_takes_zero_rows_strided_input_and_leading_dims(tier):
    q = quantize("int8", make_linear(torch.float32, 97))
    with torch.no_grad():
        assert q(torch.empty(0, K)).shape == (0, 97)
        x = torch.randn(K, 6)
        torch.testing.assert_close(q(x.t()), q(x.t().contiguous()), rtol=0, atol=0)
        assert torch.equal(q(x.t().reshape(2, 3, K)), q(x.t()).view(2, 3, 97))


@pytest.mark.parametrize("kind", ["int8", "int4", "int8g"])
@pytest.mark.parametrize("rows", [1, 5])  # 1: one pass of one row over each weight block
def test_int_gemv_result_does_not_depend_on_thread_count(kind, rows, tier):
    q = quantize(kind, make_linear(torch.bfloat16, 200))
    x = torch.randn(rows, K).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        ys = []
        for t in (1, 3):
            torch.set_num_threads(t)
            ys.append(q(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*ys)


@pytest.mark.parametrize("kind", ["int8", "int4", "int8g"])
def test_int_gemv_rows_do_not_depend_on_their_batch(kind, tier):
    """Passes of 4 rows, one or several, or a lone row: each row's dots and float steps are its own."""
    q = quantize(kind, make_linear(torch.bfloat16, 97))
    x = torch.randn(23, K).to(torch.bfloat16)
    with torch.no_grad():
        full = q(x)
        assert all(torch.equal(q(x[m0:m1]), full[m0:m1]) for m0, m1 in [(0, 1), (5, 7), (2, 6), (9, 18)])


@pytest.mark.skipif(KERNEL_TIERS[-1:] != ["avx512"], reason="needs a CPU that can play both int_gemv variants")
@pytest.mark.parametrize("kind,group_size", [("int8", 0), ("int4", 32), ("int4", 128), ("int8g", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_kernel_equals_the_vnni_kernel_bit_for_bit(kind, group_size, dtype):
    """Zero tolerance: both compute the same integer dots (vpmaddubsw + vpmaddwd vs vpdpbusd, exact)
    of the same quantized activations, then the same float steps in the same order."""
    g = torch.Generator().manual_seed(7)
    linear = nn.Linear(1024, 200).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 1024, generator=g) * torch.rand(200, 1, generator=g))
        linear.weight[::9, ::31] *= 20  # codes at both ends of the range
    x = (torch.randn(40, 1024, generator=g) * torch.rand(40, 1, generator=g) * 10).to(dtype)
    x[3, 64:96] = 0
    q = quantize(kind, linear, group_size, blocked=True)  # one layout for both
    outs = {}
    for tier, source in [("avx2", "int_gemv_avx2.c"), ("avx512", "int_gemv.c")]:
        with kernel_at(tier), torch.no_grad():
            assert native.variant("int_gemv")[0] == source
            outs[tier] = [q(x[:rows]) for rows in (1, 3, 4, 5, 17, 40)]
    assert all(torch.equal(a, b) for a, b in zip(*outs.values()))
