"""bf16w_gemm.c: pack_bf16 weights times bf16 or float32 activations in fp32 FMAs (CPUs without AVX-512
BF16), against float64, through every tile and tail; a row's result the same whatever its batch and
the thread count. Every test runs at each tier this machine can play that has a variant (AVX2,
AVX-512)."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.cpu import gemm, packing
from tests.helpers.gemm_checks import exact_integer_gemm
from tests.helpers.tiers import TIERS_HERE, at_tier


@pytest.fixture(autouse=True, params=[t for t in TIERS_HERE if t != "none"])
def tier(request):
    with at_tier(request.param):
        if gemm.bf16w_library() is None:
            pytest.skip(f"no C compiler, or no bf16w_gemm variant at tier {request.param}")
        yield request.param


def assert_fp32_sum_of(y, x, w, bias):
    """y is x @ w.T + bias summed in float32 and rounded once to y's dtype: a float32 sum of K products
    (each exact: a bf16 times a float32 fits float64) is within K 2^-24 sum |x||w| of the exact one;
    then one rounding to the output dtype (eps |ref| leaves room for the bias's float32 add)."""
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    k = x.shape[1]
    bound = torch.finfo(y.dtype).eps * ref.abs() + k * 2.0**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


def operands(rows, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    x = (torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 4).to(dtype)
    return x, w, bias


# the streaming tile (1-4 rows: 1 x 4 blocks, 2 x 2, 3 x 2, 4 x 1) and the 6-row register tile with
# every remainder (5-8, 9-16, 17, 40)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 40])
# n % 16 != 0, blocks not a multiple of 4 (the stream's 1 x 4) or 2; k pairs odd
@pytest.mark.parametrize("n,k", [(16, 2), (48, 64), (97, 200), (50, 130), (130, 6), (40, 1030)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16w_kernel_tiles_and_tails(rows, n, k, dtype):
    x, w, bias = operands(rows, n, k, dtype, rows * 1000 + n + k)
    packed = packing.pack_bf16(w)
    assert_fp32_sum_of(gemm.bf16w_gemm(x, packed, bias, n), x, w, bias)
    assert_fp32_sum_of(gemm.bf16w_gemm(x, packed, None, n), x, w, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rows_result_does_not_depend_on_its_batch(dtype):
    """Every tile sums each output as one fp32 FMA chain over k in order: any rows, any batch, any
    neighbours, the same bits."""
    x, w, bias = operands(40, 70, 3002, dtype, 3)
    packed = packing.pack_bf16(w)
    full = gemm.bf16w_gemm(x, packed, bias, 70)
    for m0, m1 in [(0, 1), (7, 8), (0, 2), (3, 6), (0, 4), (1, 6), (0, 9), (4, 17), (11, 27), (0, 39)]:
        assert torch.equal(gemm.bf16w_gemm(x[m0:m1], packed, bias, 70), full[m0:m1]), (m0, m1)


def test_bf16w_kernel_is_independent_of_thread_count_and_takes_no_rows():
    x, w, _ = operands(41, 200, 96, torch.bfloat16, 1)
    packed, threads = packing.pack_bf16(w), torch.get_num_threads()
    try:
        outs = {}
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs[t] = [gemm.bf16w_gemm(x[:rows], packed, None, 200) for rows in (1, 3, 11, 41)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for o in outs.values() for a, b in zip(o, outs[1]))
    for dtype in (torch.bfloat16, torch.float32):
        assert gemm.bf16w_gemm(x[:0].to(dtype), packed, None, 200).shape == (0, 200)


@pytest.mark.parametrize("rows", [1, 7])
def test_bf16w_kernel_rounds_to_nearest_even(rows):
    # small integers: every product and sum is exact in float32, so the only rounding is the final
    # one to bf16, which must be torch's round-to-nearest-even bit for bit (float32: no rounding)
    w, x, bias, exact = exact_integer_gemm(rows)
    packed = packing.pack_bf16(w)
    assert torch.equal(gemm.bf16w_gemm(x, packed, bias, 64), exact.to(torch.bfloat16))
    assert torch.equal(gemm.bf16w_gemm(x.float(), packed, bias, 64), exact.float())


def test_strided_input_and_a_float32_bias_read_as_bf16():
    x, w, bias = operands(5, 33, 64, torch.float32, 2)
    packed = packing.pack_bf16(w)
    want = gemm.bf16w_gemm(x, packed, bias, 33)
    assert torch.equal(gemm.bf16w_gemm(x.t().contiguous().t(), packed, bias.float(), 33), want)


def test_bf16w_equals_bf16_kernel_up_to_their_float32_sums():
    """Where both run, the AVX-512 BF16 kernel and this one give the same results within a float32
    sum of each other (both accumulate exact products in float32, in different orders)."""
    if gemm.bf16_library() is None:
        pytest.skip("no AVX-512 BF16 here")
    x, w, bias = operands(9, 100, 512, torch.bfloat16, 5)
    packed = packing.pack_bf16(w)
    a, b = gemm.bf16w_gemm(x, packed, bias, 100), gemm.bf16_gemm(x, packed, bias, 100)
    size = x.double().abs() @ w.double().abs().t()
    assert ((a.double() - b.double()).abs() <= 2**-7 * a.double().abs().maximum(b.double().abs())
            + 512 * 2.0**-23 * size).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_linear_takes_bf16w_for_bf16_weights_in_float32_arithmetic(dtype):
    """FastLinear's path where bf16 matmuls would be emulated (compute_dtype float32): the packed bf16
    weights, no float32 copy, inputs of either dtype, the same as the kernel itself; an input dtype the
    kernel doesn't take falls back to F.linear on the unpacked weight."""
    from qwen2vl.backends.cpu.linear import FastLinear

    x, w, bias = operands(7, 48, 96, dtype, 6)
    fast = FastLinear(w, bias, compute_dtype=torch.float32)
    assert fast.path == "bf16w kernel" and fast.weight is None and fast.packed.dtype == torch.bfloat16
    assert torch.equal(fast.dense_weight(), w)
    with torch.no_grad():
        y = fast(x.view(7, 1, 96))
        assert y.shape == (7, 1, 48) and y.dtype == dtype
        assert torch.equal(y.view(7, 48), gemm.bf16w_gemm(x, packing.pack_bf16(w), bias, 48))
        assert_fp32_sum_of(y.view(7, 48), x, w, bias)
        half = fast(x.half())
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), y.view(7, 48).float(), rtol=1e-2, atol=0.1)
    assert FastLinear(w, bias, use_kernel=False, compute_dtype=torch.float32).path != "bf16w kernel"
