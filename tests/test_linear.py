"""FastLinear (oneDNN on a reordered weight, F.linear fallback) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.linear import FastLinear, fuse_linears, speed_up_linears

# k not a multiple of the 32-wide vector and n odd, so the kernels' tail loops run too
N, K = 97, 200


def close_to_linear(y, x, weight, bias):
    """Within one rounding of the output dtype of F.linear computed in float64."""
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    eps = torch.finfo(x.dtype).eps
    # each result is a float32 sum (error ~ K eps32 |w||x|) rounded once to the output dtype
    bound = eps * ref.abs() + 1e-6 * (x.double().abs() @ weight.double().abs().t()) + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_fast_linear_matches_f_linear(rows, bias, dtype):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(K, N, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(N, generator=g))
    x = torch.randn(rows, K, generator=g).to(dtype)
    fast = FastLinear.from_linear(linear)
    if dtype != torch.float16 and torch.backends.mkldnn.is_available():
        assert fast.packed is not None, "oneDNN path not taken"
    with torch.no_grad():
        close_to_linear(fast(x), x, linear.weight, linear.bias)


def test_leading_dims_and_strided_input():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g, dtype=torch.bfloat16)
    fast = FastLinear(w)
    assert torch.equal(fast.dense_weight(), w)
    for shape in [(1, 1, K), (2, 5, K), (K, 3)]:
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        x = x.t() if shape == (K, 3) else x  # a transposed view: rows not contiguous
        with torch.no_grad():
            y = fast(x)
        assert y.shape == (*x.shape[:-1], N)
        close_to_linear(y.reshape(-1, N), x.reshape(-1, K), w, None)


def test_fused_linears_equal_the_separate_ones():
    torch.manual_seed(0)
    q, k, v = nn.Linear(K, 64), nn.Linear(K, 16), nn.Linear(K, 16, bias=False)
    x = torch.randn(2, K)
    fused = FastLinear.from_linear(fuse_linears([q, k, v]))
    assert fused.out_features == 96
    with torch.no_grad():
        yq, yk, yv = fused(x).split([64, 16, 16], dim=-1)
        for y, m in [(yq, q), (yk, k), (yv, v)]:
            close_to_linear(y, x, m.weight, m.bias)


def test_speed_up_linears_swaps_decoder_keeps_vision_and_embedding():
    model = nn.Module()
    model.visual = nn.Sequential(nn.Linear(8, 8))
    model.embed = nn.Embedding(10, 8)
    model.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4, bias=False)])
    model.lm_head = nn.Linear(8, 10, bias=False)
    model.lm_head.weight = model.embed.weight
    assert speed_up_linears(model) == 3
    assert type(model.visual[0]) is nn.Linear
    assert all(isinstance(m, FastLinear) for m in [*model.layers, model.lm_head])
    # a tied head gets its own reordered copy; the embedding keeps its plain table
    assert torch.equal(model.lm_head.dense_weight(), model.embed.weight)
