"""csrc/int8_mm.c (W8A8, activations per row) at every tier this machine can play: bit-equal to its
formula computed by torch on the same quantized operands (the integer dots exactly, in int64), a
row's output the same whatever rows share its call, and the AVX2, AVX-512 VNNI and AMX builds equal."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.cpu import int8_mm, packing
from tests.helpers.tiers import TIERS_HERE, at_tier, tier_fixture

tier = tier_fixture(lambda: int8_mm.library() is not None)


def quantized_linear(n: int, k: int, scales_dtype: torch.dtype, seed: int = 0):
    """Codes int8 [n, k] in [-127, 127], scales [n], and the kernel's packed operands."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q[0, :8] = 127  # the largest products, to check nothing saturates
    q[1, :8] = -127
    scales = (torch.rand(n, generator=g) * 0.01 + 1e-3).to(scales_dtype)
    return q, scales, packing.pack_int8(packing.pad_rows(q, packing.ROWS)), packing.pad_rows(scales, packing.ROWS)


def reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's formula in torch: x quantized per row in float32 (round half to even), the dot in
    int64, then ((dot * d) * sw) + bias in float32, rounded to x's dtype."""
    xf = x.float()
    d = xf.abs().amax(1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(xf * inv[:, None]).to(torch.int64)
    assert xq.abs().max() <= 127
    dot = xq @ q.to(torch.int64).t()
    y = (dot.float() * d[:, None]) * scales.float()
    if bias is not None:
        y = y + bias.to(x.dtype).float()
    return y.to(x.dtype)


def inputs(rows: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, 5] = 200  # an outlier sets its row's scale
    if rows > 2:
        x[2] = 0  # a row of zeros: scale 0
    return x.to(dtype)


# 1-3 rows; tiles of 4 (AVX2) or 8 (VNNI) rows and remainders; blocks of 16 outputs with a padded tail
# (AMX: K % 64 == 0 takes the tiles, in row groups of 32 with the rest zero)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 21, 40])
@pytest.mark.parametrize("n,k", [(96, 64), (113, 200), (50, 1176), (70, 1280)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_mm_is_bit_equal_to_its_formula(rows, n, k, dtype, tier):
    q, scales, w, sw = quantized_linear(n, k, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    bias = None if rows % 2 else torch.randn(n).to(dtype)
    x = inputs(rows, k, dtype)
    y = int8_mm.int8_mm(x, w, sw, bias, n)
    assert y.dtype == dtype and y.shape == (rows, n)
    torch.testing.assert_close(y, reference(x, q, scales, bias), rtol=0, atol=0)


def test_a_row_does_not_depend_on_its_batch_nor_the_threads(tier):
    q, scales, w, sw = quantized_linear(70, 136, torch.bfloat16)
    x = inputs(37, 136, torch.bfloat16)
    whole = int8_mm.int8_mm(x, w, sw, None, 70)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.cat([int8_mm.int8_mm(x[i: i + 1], w, sw, None, 70) for i in range(37)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one)


def test_the_tiers_builds_give_the_same_bits():
    built = [t for t in TIERS_HERE if t != "none"]
    if len(built) < 2:
        pytest.skip("one kernel tier on this machine")
    q, scales, w, sw = quantized_linear(64, 1280, torch.float32)
    x = inputs(13, 1280, torch.float32)
    outs = []
    for t in built:
        with at_tier(t):
            outs.append(int8_mm.int8_mm(x, w, sw, None, 64))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_an_in_features_over_the_int32_limit_is_refused():
    if int8_mm.library() is None:
        pytest.skip("no int8_mm kernel here")
    k = int8_mm.MAX_K + 4
    with pytest.raises(ValueError, match="65536"):
        int8_mm.int8_mm(torch.zeros(1, k), torch.zeros(1, k // 4, 16, 4, dtype=torch.uint8), torch.ones(16), None, 16)


def test_amx_tiles_that_are_refused_or_differ_stay_off(monkeypatch, caplog):
    """int8_mm.amx_check: a refused tile state, or a product that isn't the VNNI tile's bits, leaves
    the tiles off (logged); an equal one leaves them on."""
    import logging

    class Lib:
        def __init__(self, grant):
            self.grant, self.calls = grant, []

        def int8_mm_amx(self, enable):
            self.calls.append(enable)
            return int(self.grant and enable != 0)

    outputs = []
    monkeypatch.setattr(int8_mm, "int8_mm", lambda *a: outputs.pop(0))
    with caplog.at_level(logging.WARNING, logger="qwen2vl.backends.cpu.int8_mm"):
        assert int8_mm.amx_check(Lib(False)) is False and "refused" in caplog.text
        outputs[:] = [torch.ones(2), torch.ones(2)]
        same = Lib(True)
        assert int8_mm.amx_check(same) is True and same.calls == [1, 0, 1]
        outputs[:] = [torch.ones(2), torch.zeros(2)]
        differ = Lib(True)
        assert int8_mm.amx_check(differ) is False and differ.calls == [1, 0] and "differs" in caplog.text
