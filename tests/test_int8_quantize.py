"""pack.c's quantize_int8 (weights quantized at load straight into pack_int8's layout) gives the bits
of the torch code it replaces (backends/quant.py's quantize_int8_rows + pack_int8), at every tier
this machine can play that builds it, with ties, tiny rows and rows past a block of 16."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qwen2vl.backends.cpu import native, packing
from qwen2vl.backends.quant import Int8Linear, quantize_int8_rows
from tests.helpers.tiers import tier_fixture

tier = tier_fixture(lambda: native.library("pack") is not None)


def weights(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 0.05
    w[1] = 0  # the scale's floor (1e-8 / 127)
    w[2] = 1e-12
    # amax 127 -> scale exactly 1: w / s lands on halves, which round to even
    w[3] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5]).repeat(k // 8 + 1)[:k]
    w[4, 0] = -30  # a negative outlier sets its row's scale
    return w.to(dtype)


@pytest.mark.parametrize("n,k", [(37, 100), (48, 64), (16, 1176)])  # a padded last block; k % 8 == 4
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_int8_gives_the_torch_codes_and_scales(n, k, dtype, tier):
    w = weights(n, k, dtype)
    codes, scales = packing.quantize_int8(w, huge_pages=False)
    q, ref_scales = quantize_int8_rows(w)
    assert scales.dtype == dtype and codes.shape == (-(-n // 16), k // 4, 16, 4)
    assert torch.equal(codes, packing.pack_int8(packing.pad_rows(q, packing.ROWS)))
    assert torch.equal(scales, packing.pad_rows(ref_scales, packing.ROWS))  # positive or 0: equal values, equal bits
    assert q[3, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, -126]  # the ties above, to even


def test_int8_linear_from_linear_takes_it_and_falls_back_where_it_cannot(tier):
    linear = nn.Linear(64, 40, bias=True).bfloat16()
    fast = Int8Linear.from_linear(linear, blocked=True)
    q, scales = quantize_int8_rows(linear.weight.detach())
    slow = Int8Linear.from_codes(q, scales, linear.bias.detach().clone(), blocked=True)
    for a, b in ((fast.weight, slow.weight), (fast.scales, slow.scales), (fast.bias, slow.bias)):
        assert torch.equal(a, b)
    assert packing.quantize_int8(linear.weight.half()) is None  # float16: the torch code
    assert packing.quantize_int8(torch.zeros(16, 6)) is None  # k % 4 != 0
