"""The CPU tiers (backends/cpu/isa.py) and the kernel build (backends/cpu/native.py): caps, variants,
and kernels.h read into the same ctypes types the C code was compiled against."""

from __future__ import annotations

import ctypes

import pytest

from qwen2vl.backends.cpu import isa, native
from tests.helpers.tiers import TIERS_HERE, at_tier

ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
ZEN5 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16", "avx512_vnni", "avx_vnni"}
ICELAKE = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
SAPPHIRE = ZEN5 | {"amx_tile", "amx_bf16", "amx_int8"}


@pytest.mark.parametrize("flags,cap,tier,has,lacks", [
    (set(), None, "none", (), ("avx2",)),
    ({"avx2", "fma"}, None, "none", (), ("avx2",)),  # no F16C: not the avx2 tier, and nothing of it is used
    (ZEN3, None, "avx2", ("avx2", "fma", "f16c"), ("avx512f",)),
    (ZEN5, None, "avx512", ("avx512_bf16", "avx512_vnni"), ("amx_tile", "avx_vnni")),
    (ZEN5, "avx2", "avx2", ("avx2",), ("avx512f", "avx512_bf16", "avx_vnni")),
    (ZEN5, "none", "none", (), ("avx2", "avx512f")),
    (ZEN5, "amx", "avx512", ("avx512_bf16",), ("amx_tile",)),  # a cap can't add what the CPU lacks
    (ICELAKE, None, "avx512", ("avx512_vnni",), ("avx512_bf16",)),
    (SAPPHIRE, None, "amx", ("amx_bf16", "avx512_bf16"), ()),
    (SAPPHIRE, "avx512", "avx512", ("avx512_bf16",), ("amx_tile",)),
])
def test_tier_and_cap(flags, cap, tier, has, lacks, monkeypatch):
    monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")
    got = isa.capped(flags, cap)
    assert got.tier == tier
    assert got.has(*has) and not any(got.has(f) for f in lacks)
    assert got.native_bf16_matmul == (got.has("avx512_bf16") or got.has("amx_bf16"))


def test_not_x86_is_tier_none_and_a_bad_cap_is_named(monkeypatch):
    monkeypatch.setattr(isa.platform, "machine", lambda: "aarch64")
    assert isa.capped(ZEN5, None).tier == "none"
    with pytest.raises(ValueError, match="QWEN2VL_CPU_ISA must be one of none, avx2, avx512, amx, got 'sse'"):
        isa.capped(ZEN5, "sse")


def test_header_types_match_the_c_prototypes():
    h = native.header()
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    assert h.functions["bf16_gemm"] == (None, [p, p, p, p, i64, i64, i64, i32])
    assert h.functions["rms_norm"] == (None, [p, p, p, p, p, i64, i64, f32, i32])
    assert h.functions["int4_gemm"] == (i32, [p, p, i32, p, p, p, i32, i64, i64, i64, i64, i32])
    assert h.functions["bf16w_gemm"] == (i32, [p, p, p, p, i32, i64, i64, i64, i32])
    assert h.functions["decode_step_work"] == (i64, [p])
    linear = h.structs["Linear"]
    assert [name for name, _ in linear._fields_] == ["kind", "fn", "w", "scales", "bias", "scales_bf16", "n", "k",
                                                      "group"]
    assert ctypes.sizeof(linear) == 9 * 8
    layer = dict(h.structs["Layer"]._fields_)
    assert layer["qkv"] is linear and layer["norm1"] is p
    assert dict(h.structs["Decoder"]._fields_)["eps"] is f32


@pytest.mark.parametrize("tier", TIERS_HERE)
def test_each_library_loads_exactly_where_its_variant_runs(tier):
    """Every library has a variant for every tier this machine can play or none at all, and each
    one that loads exports every function kernels.h declares for it, typed."""
    with at_tier(tier) as here:
        for name, variants in native.VARIANTS.items():
            lib = native.library(name)
            runnable = [src for src, feats in variants if here.has(*feats) and (feats or here.tier != "none")]
            assert (lib is not None) == bool(runnable), (name, tier)
            if lib is not None:
                declared = [f for f in native.header().functions if hasattr(lib, f)]
                assert declared, name
                assert all(getattr(lib, f).argtypes == native.header().functions[f][1] for f in declared)


def test_a_cap_above_the_cpu_changes_nothing():
    with at_tier("amx") as here:
        assert here.tier == isa.capped(isa._cpuinfo_flags(), None).tier
