"""FastLinear (our bf16 kernel, oneDNN on a reordered weight, F.linear fallback) against F.linear."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.cpu import gemm, isa, native, packing
from qwen2vl.backends.cpu.linear import FastLinear, reorder_weight, speed_up_linears
from qwen2vl.text import fuse_linears
from tests.helpers.gemm_checks import exact_integer_gemm

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
    if dtype == torch.bfloat16 and gemm.bf16_library() is not None:
        assert fast.path == "bf16 kernel"
    elif dtype == torch.bfloat16 and gemm.bf16w_library() is not None:  # float32 FMAs on the packed weights
        assert fast.path == "bf16w kernel"
    elif reorder_weight(linear.weight.to(isa.current().matmul_dtype(dtype))) is not None:
        # oneDNN in the CPU's matmul dtype (float32 where bf16/fp16 is emulated), where it takes that dtype:
        # fp16 on a CPU with AVX-512 FP16 under ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (CI's avx512 pass) it doesn't
        assert fast.path == "oneDNN"
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


needs_bf16_kernel = pytest.mark.skipif(gemm.bf16_library() is None, reason="no C compiler or no AVX-512 BF16 here")


@needs_bf16_kernel
# the streaming tile (<= 4 rows), the register tile (5-8, > 16) and the wide tile (9-16)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 8, 9, 12, 16, 17, 40])
@pytest.mark.parametrize("n,k", [(16, 2), (48, 64), (97, 200), (50, 130), (130, 6)])  # k pairs odd; n % 16, % 48
def test_bf16_kernel_tiles_and_tails(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    packed = packing.pack_bf16(w)
    assert packed.shape == ((n + 15) // 16, k // 2, 16, 2) and torch.equal(packing.unpack_bf16(packed, n), w)
    close_to_linear(gemm.bf16_gemm(x, packed, bias, n), x, w, bias)
    close_to_linear(gemm.bf16_gemm(x, packed, None, n), x, w, None)


@needs_bf16_kernel
def test_the_wide_and_the_register_tile_sum_in_the_same_order():
    """9-16 rows take the wide tile, more the register tile: a row's output must not depend on
    how many rows share its batch (both add k pairs into one fp32 sum, in order)."""
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(70, 3000, generator=g).to(torch.bfloat16), torch.randn(70, generator=g).to(torch.bfloat16)
    x = torch.randn(24, 3000, generator=g).to(torch.bfloat16)
    packed = packing.pack_bf16(w)
    tiled = gemm.bf16_gemm(x, packed, bias, 70)
    for rows in (9, 13, 16):
        assert torch.equal(gemm.bf16_gemm(x[:rows], packed, bias, 70), tiled[:rows])


@needs_bf16_kernel
def test_bf16_kernel_is_independent_of_thread_count_and_takes_no_rows():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 96, generator=g).to(torch.bfloat16)
    x = torch.randn(11, 96, generator=g).to(torch.bfloat16)
    packed, threads = packing.pack_bf16(w), torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(gemm.bf16_gemm(x, packed, None, 200))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert gemm.bf16_gemm(x[:0], packed, None, 200).shape == (0, 200)


def test_kernel_and_onednn_paths_agree_and_fall_back():
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(K, N).to(torch.bfloat16)
    x = torch.randn(3, K, generator=g).to(torch.bfloat16)
    onednn = FastLinear.from_linear(linear, use_kernel=False)
    assert onednn.path == ("oneDNN" if torch.backends.mkldnn.is_available() else "F.linear")
    odd = FastLinear(torch.randn(N, K + 1, generator=g).to(torch.bfloat16))  # odd K: not the kernel's
    assert odd.path != "bf16 kernel"
    with torch.no_grad():
        close_to_linear(FastLinear.from_linear(linear)(x), x, linear.weight, linear.bias)
        close_to_linear(onednn(x), x, linear.weight, linear.bias)
        # float32 input to a bf16 FastLinear: F.linear on the unpacked weight
        y = FastLinear.from_linear(linear)(x.float())
        close_to_linear(y, x.float(), linear.weight.float(), linear.bias.float())


@needs_bf16_kernel
@pytest.mark.parametrize("rows", [1, 7])
def test_bf16_kernel_rounds_to_nearest_even(rows):
    # small integers: every product and sum is exact in float32, so the only rounding is the
    # final one to bf16 (sums up to ~2^14 keep 8 bits: ties and round-ups happen), which must be
    # torch's round-to-nearest-even bit for bit
    w, x, bias, exact = exact_integer_gemm(rows)
    assert torch.equal(gemm.bf16_gemm(x, packing.pack_bf16(w), bias, 64), exact.to(torch.bfloat16))


def test_bf16_kernel_build_failure_falls_back_to_onednn_and_logs_once(monkeypatch, tmp_path, caplog):
    import logging

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "bf16_gemm.c").write_text("void bf16_gemm(void) { return }\n")
    monkeypatch.setattr(native, "CSRC", tmp_path)
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="qwen2vl.backends.cpu.native"):
            fast = FastLinear(torch.randn(N, K).to(torch.bfloat16))
            FastLinear(torch.randn(N, K).to(torch.bfloat16))
        assert fast.path != "bf16 kernel"
        assert caplog.text.count("bf16_gemm: compile failed") == (1 if native.variant("bf16_gemm") else 0), caplog.text
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def _vm_flags(address: int) -> set[str]:
    """VmFlags of the mapping of this process that holds `address` (Linux smaps): "hg" is there when
    the range was advised MADV_HUGEPAGE. The advice, not the pages the kernel then finds, is what our
    code controls: whether 2 MiB pages are free at that moment depends on the whole machine."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    return set()


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
                    or "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read(),
                    reason="no transparent huge pages here")
def test_packed_weights_are_advised_onto_huge_pages(monkeypatch):
    w = torch.randn(4096, 1536).to(torch.bfloat16)  # 12 MiB: several whole 2 MiB pages inside
    packed = packing.pack_bf16(w)
    assert torch.equal(packing.unpack_bf16(packed, 4096), w)
    assert "hg" in _vm_flags(packed.data_ptr() + packed.numel())  # the middle is advised onto huge pages
    small = packing.empty_huge((10,), torch.float32)  # too small to advise: plain memory
    assert small.shape == (10,)

    # huge_pages=False (as LLM packs the vision tower) never asks for advised memory. Checked on the
    # call, not on the flags: malloc may hand out heap memory that other code advised earlier in the run
    def refuse(*args):
        raise AssertionError("huge pages asked for")

    monkeypatch.setattr(packing, "empty_huge", refuse)
    fast = FastLinear(w, huge_pages=False)
    assert torch.equal(fast.dense_weight().to(w.dtype), w)


def test_empty_huge_survives_a_kernel_without_thp(monkeypatch):
    import mmap
    import types

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")  # what MADV_HUGEPAGE gives on a kernel without THP

    fake = types.SimpleNamespace(mmap=Refusing, MADV_HUGEPAGE=mmap.MADV_HUGEPAGE, MAP_PRIVATE=mmap.MAP_PRIVATE,
                                 MAP_ANONYMOUS=mmap.MAP_ANONYMOUS)
    monkeypatch.setattr(packing, "mmap", fake)
    t = packing.empty_huge((3 << 20,), torch.float32)
    t.fill_(2)
    assert t.shape == (3 << 20,) and t.sum().item() == 6 << 20


@pytest.mark.skipif(native.library("pack") is None, reason="pack.c is built only where a kernel that reads it runs")
@pytest.mark.parametrize("huge", [True, False])
@pytest.mark.parametrize("n,words", [(16, 1), (97, 100), (33, 64), (2048, 129)])  # n % 16, words % 64
def test_pack_c_writes_the_layout_torch_does(monkeypatch, n, words, huge):
    """pack.c's blocks of 16 rows equal torch's strided copy, zero rows included, at any thread count."""
    w = torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    threads = torch.get_num_threads()
    ours = [packing.pack_words(w, huge)]
    torch.set_num_threads(1)
    try:
        ours.append(packing.pack_words(w, huge))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(native, "library", lambda name: None)
    theirs = packing.pack_words(w, huge)
    assert theirs.shape == ((n + 15) // 16, words, 16)
    for out in ours:
        assert torch.equal(out, theirs)
