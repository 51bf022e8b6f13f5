"""Run code as if on a smaller CPU: the QWEN2VL_CPU_ISA cap, in-process.

`at_tier(tier)` sets the cap and drops the cached features and libraries, so kernel code picks
what a CPU of that tier would; `TIERS_HERE` lists the tiers this machine can play (its own and
every one below). Modules that chose a path when they were built (FastLinear, the quantized
linears) keep it: build them inside the block. `tier_fixture(available)` runs a kernel test once
per tier here, inside the block.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from qwen2vl.backends.cpu import isa, native

TIERS_HERE = isa.TIERS[: isa.TIERS.index(isa.capped(isa._cpuinfo_flags(), None).tier) + 1]


def _reset():
    isa.current.cache_clear()
    native.library.cache_clear()


@contextlib.contextmanager
def at_tier(tier: str):
    old = os.environ.get(isa.ENV)
    os.environ[isa.ENV] = tier
    _reset()
    try:
        yield isa.current()
    finally:
        if old is None:
            os.environ.pop(isa.ENV, None)
        else:
            os.environ[isa.ENV] = old
        _reset()


def tier_fixture(available):
    """A fixture `tier` for a test module: each test that takes it runs once per tier in TIERS_HERE,
    inside at_tier, and is skipped at a tier where `available()` (its kernels load) is false."""
    @pytest.fixture(params=TIERS_HERE)
    def tier(request):
        with at_tier(request.param):
            if not available():
                pytest.skip(f"no kernels at tier {request.param}")
            yield request.param

    return tier
