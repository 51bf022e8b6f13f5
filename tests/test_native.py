"""The CPU tiers (backends/cpu/isa.py) and the kernel build (backends/cpu/native.py): caps, variants,
and kernels.h read into the same ctypes types the C code was compiled against."""

from __future__ import annotations

import ctypes

import pytest

from qwen2vl.backends.cpu import isa, native, packing
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


def test_weights_read_once_are_prefetched_by_vendor_and_the_hint_changes_no_result():
    """prefetchnta on AMD (and where the vendor is unknown), prefetcht1 on Intel, compiled into every
    kernel; the hint moves no bit of a product (bf16w_gemm built with each, streaming one row)."""
    import torch


    assert isa.capped(ZEN5, None, "AuthenticAMD").stream_locality == 0
    assert isa.capped(SAPPHIRE, None, "GenuineIntel").stream_locality == 2
    assert isa.capped(ZEN3, None).stream_locality == 0
    assert f"-DSTREAM_LOCALITY={isa.current().stream_locality}" in native.flags_for(native.AVX2)
    if not isa.current().has(*native.AVX2):
        pytest.skip("no AVX2 here")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(1, 96, generator=g)
    packed, outs = packing.pack_bf16(w, huge_pages=False), []
    for locality in (0, 2):
        flags = [f for f in native.flags_for(native.AVX2) if not f.startswith("-DSTREAM_LOCALITY")]
        lib = ctypes.CDLL(str(native.build(native.CSRC / "bf16w_gemm.c", [*flags, f"-DSTREAM_LOCALITY={locality}"])))
        native.header().type_functions(lib)
        y = torch.empty(1, 40)
        assert lib.bf16w_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(), None, 0, 1, 40, 96, 1) == 0
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], x @ w.float().t(), rtol=1e-5, atol=1e-5)


def test_header_types_match_the_c_prototypes():
    h = native.header()
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    assert h.functions["bf16_gemm"] == (None, [p, p, p, p, i64, i64, i64, i32])
    assert h.functions["rms_norm"] == (None, [p, p, p, p, p, i64, i64, f32, i32])
    assert h.functions["int4_gemm"] == (i32, [p, p, i32, p, p, p, i32, i64, i64, i64, i64, i32])
    assert h.functions["int8g_gemm"] == h.functions["int4_gemm"]  # decode_step.c calls both through one type
    assert h.functions["bf16w_gemm"] == (i32, [p, p, p, p, i32, i64, i64, i64, i32])
    assert h.functions["decode_step_work"] == (i64, [p])
    linear = h.structs["Linear"]
    assert [name for name, _ in linear._fields_] == ["kind", "fn", "w", "scales", "bias", "scales_bf16", "n", "k",
                                                      "group", "amx", "amx_rows"]
    assert ctypes.sizeof(linear) == 11 * 8
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


def test_a_variant_that_does_not_build_gives_way_to_the_next(monkeypatch, caplog):
    """An AMX variant on a compiler without -mamx-tile: the AVX-512 one loads instead, and says so."""
    import logging
    import subprocess

    real = native.build

    def build(source, flags):
        if "-mavx512bf16" in flags and "-mamx-tile" not in flags:
            return real(source, flags)
        raise subprocess.CalledProcessError(1, "cc", stderr="cc: error: unrecognized option")

    monkeypatch.setattr(native, "build", build)
    monkeypatch.setattr(native, "VARIANTS", {**native.VARIANTS, "bf16_gemm": [
        ("bf16_gemm.c", ()), ("bf16_gemm.c", native.VARIANTS["bf16_gemm"][-1][1])]})
    monkeypatch.setattr(native, "variants", lambda name: native.VARIANTS[name])  # as on a CPU that runs both
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="qwen2vl.backends.cpu.native"):
            lib = native.library("bf16_gemm")
        # (compiled and loaded, not run: that needs no AVX-512 here)
        assert lib.variant == native.VARIANTS["bf16_gemm"][-1] and "trying the next variant" in caplog.text
        assert "compile failed" not in caplog.text
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def amx_build():
    """bf16_gemm.c built as the AMX variant (compiled here whatever the CPU: loading it needs only
    AVX-512 BF16 while its tiles are off), or None where the compiler or the CPU can't."""
    import subprocess

    if not isa.current().has(*native.VARIANTS["bf16_gemm"][-1][1]):
        return None
    try:
        path = native.build(native.CSRC / "bf16_gemm.c", native.flags_for(native.VARIANTS["bf16_gemm"][0][1]))
    except (subprocess.CalledProcessError, OSError):
        return None
    lib = ctypes.CDLL(str(path))
    native.header().type_functions(lib)
    return lib


def test_the_amx_variant_builds_and_with_its_tiles_off_is_the_avx512_kernel():
    import torch

    from qwen2vl.backends.cpu import gemm

    lib = amx_build()
    if lib is None:
        pytest.skip("no AVX-512 BF16 here, or a compiler without AMX")
    # off until switched on, unless this process loaded this very library before (its tiles on where
    # the CPU has them: natively, or in an earlier test at the amx tier): switched off for the check
    was_on = lib.bf16_gemm_amx(-1)
    lib.bf16_gemm_amx(0)
    try:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(37, 96, generator=g).bfloat16()
        packed, bias = packing.pack_bf16(w, huge_pages=False), torch.randn(40, generator=g).bfloat16()
        y = torch.empty(37, 40, dtype=torch.bfloat16)
        lib.bf16_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(), bias.data_ptr(), 37, 40, 96, 1)
        assert torch.equal(y, gemm.bf16_gemm(x, packed, bias, 40))
    finally:
        if was_on:
            lib.bf16_gemm_amx(1)


@pytest.mark.parametrize("m, n, k", [(17, 16, 32), (32, 48, 64), (37, 40, 96), (100, 130, 1280), (300, 256, 512)])
def test_amx_tiles_compute_within_float32_rounding_where_the_cpu_has_them(m, n, k):
    """On a CPU with AMX: the tiles against float64, rows and columns past the tiles' 32 and 16
    included, with two threads (each configures its own tile state)."""
    import torch


    lib = amx_build()
    if lib is None or not isa.current().has("amx_bf16"):
        pytest.skip("no AMX here (or a compiler without it)")
    was_on = lib.bf16_gemm_amx(-1)
    if not lib.bf16_gemm_amx(1):
        pytest.skip("Linux refused the AMX tile state")
    try:
        g = torch.Generator().manual_seed(m)
        w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
        packed, bias = packing.pack_bf16(w, huge_pages=False), torch.randn(n, generator=g).bfloat16()
        y = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
        lib.bf16_gemm(packed.data_ptr(), x.data_ptr(), y.data_ptr(), bias.data_ptr(), m, n, k, 2)
        ref = x.double() @ w.double().t() + bias.double()
        bound = 2**-8 * ref.abs() + k * 2.0**-23 * (x.double().abs() @ w.double().abs().t()) + 1e-30
        assert ((y.double() - ref).abs() <= bound).all()
    finally:
        if not was_on:
            lib.bf16_gemm_amx(0)


def test_with_amx_tiles_on_a_row_of_a_call_of_9_or_more_rows_does_not_depend_on_the_others():
    """Every call of more than 8 rows takes the tiles, in row groups of 32 whose sums run in one order
    whatever M: a row's output is the same among 9 rows as among 40 (batched decode, prefill)."""
    import torch

    from qwen2vl.backends.cpu import gemm

    lib = gemm.bf16_library()
    if lib is None or not lib.amx:
        pytest.skip("no AMX tiles switched on here")
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(300, 1536, generator=g).bfloat16(), torch.randn(40, 1536, generator=g).bfloat16()
    packed = packing.pack_bf16(w, huge_pages=False)
    full = gemm.bf16_gemm(x, packed, None, 300)
    for m in (9, 16, 17, 31, 33):
        assert torch.equal(gemm.bf16_gemm(x[:m], packed, None, 300), full[:m])


def test_amx_tiles_that_compute_wrong_are_switched_off(monkeypatch, caplog):
    """The load-time check (gemm.amx_check): a refused tile state or a wrong product leaves them off."""
    import logging

    import torch

    from qwen2vl.backends.cpu import gemm

    class Lib:
        def __init__(self, grant):
            self.grant, self.calls = grant, []

        def bf16_gemm_amx(self, enable):
            self.calls.append(enable)
            return int(self.grant and enable != 0)

    with caplog.at_level(logging.WARNING, logger="qwen2vl.backends.cpu.gemm"):
        assert gemm.amx_check(Lib(False)) is False
        assert "refused" in caplog.text
        def exact(x, packed, bias, n):
            return (x.float() @ packing.unpack_bf16(packed, n).float().t() + bias.float()).bfloat16()

        monkeypatch.setattr(gemm, "bf16_gemm", exact)
        assert gemm.amx_check(Lib(True)) is True
        monkeypatch.setattr(gemm, "bf16_gemm", lambda *a: exact(*a) + torch.tensor(0.5).bfloat16())
        wrong = Lib(True)
        assert gemm.amx_check(wrong) is False and wrong.calls == [1, 0]
        assert "failed their check" in caplog.text


def test_amx_tiles_are_checked_and_on_unless_switched_off(monkeypatch):
    """The AMX variant's tiles go on where they pass their check; with QWEN2VL_AMX=0 they are never
    asked for (nor checked)."""
    from qwen2vl.backends.cpu import gemm

    class Lib:
        variant = ("bf16_gemm.c", native.VARIANTS["bf16_gemm"][0][1])

        def bf16_gemm_amx(self, enable):
            raise AssertionError("asked for the tiles")

    monkeypatch.setenv(gemm.AMX_ENV, "0")
    monkeypatch.setattr(native, "library", lambda name: lib)
    lib = Lib()
    assert gemm.bf16_library() is lib and lib.amx is False
    monkeypatch.delenv(gemm.AMX_ENV)
    monkeypatch.setattr(gemm, "amx_check", lambda lib: True)
    lib = Lib()
    assert gemm.bf16_library().amx is True
    monkeypatch.setattr(gemm, "amx_check", lambda lib: False)
    lib = Lib()
    assert gemm.bf16_library().amx is False


def test_info_says_whether_the_amx_tiles_are_on(monkeypatch):
    """`qwen2vl info --system`'s kernel lines: an AMX build says whether its tiles passed their check."""
    from qwen2vl.backends import system
    from qwen2vl.backends.cpu import gemm, int8_mm

    class Lib:
        def __init__(self, features, amx):
            self.variant, self.amx = ("bf16_gemm.c", features), amx

    for amx, said in ((True, "; AMX tiles on"), (False, "; AMX tiles off (QWEN2VL_AMX=0")):
        monkeypatch.setattr(gemm, "bf16_library", lambda amx=amx: Lib(native.VARIANTS["bf16_gemm"][0][1], amx))
        assert system._amx_tiles("bf16_gemm").startswith(said)
    monkeypatch.setattr(int8_mm, "library", lambda: Lib(native.VARIANTS["int8_mm"][1][1], False))
    assert system._amx_tiles("int8_mm") == "" and system._amx_tiles("layer_ops") == ""
