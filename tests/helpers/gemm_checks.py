"""Operands the bf16 GEMM kernels' rounding tests share (tests/test_linear.py, tests/test_bf16w.py)."""

from __future__ import annotations

import torch


def exact_integer_gemm(rows: int):
    """(w [64, 64], x [rows, 64], bias, exact float64 x @ w.T + bias) of small integers: every product
    and sum is exact in float32, so a kernel's only rounding is its final one to bf16. Sums reach
    ~2^14, past bf16's 8 bits, so ties and round-ups happen (asserted)."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randint(-16, 17, (64, 64), generator=g).to(torch.bfloat16)
    x = torch.randint(-16, 17, (rows, 64), generator=g).to(torch.bfloat16)
    bias = torch.randint(-64, 65, (64,), generator=g).to(torch.bfloat16)
    exact = x.double() @ w.double().t() + bias.double()
    assert (exact.abs() > 256).any()  # rounding happens
    return w, x, bias, exact
