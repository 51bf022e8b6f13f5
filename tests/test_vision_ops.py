"""The vision tower's C kernels (qwen2vl/backends/cpu/csrc/vision_ops.c) against the torch code they replace,
and a tower using them (the CPU backend's VisionKernels) against one that doesn't: equal bit for bit, in bf16 and
float32, at every CPU tier this machine can play (the `tier` fixture)."""

import functools
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import qwen2vl.attention as attention
from qwen2vl import Qwen2VL
from qwen2vl.backends.cpu import vision_ops
from qwen2vl.backends.cpu.backend import CpuBackend
from qwen2vl.backends.kernel_ops import VisionKernels
from qwen2vl.backends.reference import TORCH_OPS
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.layer_op_checks import assert_vision_rotary_equals_apply_rotary_in_float32
from tests.helpers.tiers import tier_fixture

pytestmark = pytest.mark.skipif(vision_ops.library() is None, reason="vision kernels can't be built or run here")
tier = tier_fixture(lambda: vision_ops.library() is not None)
BF16 = torch.bfloat16


def randn(*shape, scale=1.0, seed=0, dtype=BF16):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("shape", [(1024, 5120), (3, 7), (1, 1)])
def test_quick_gelu_equals_torch_bit_for_bit(shape, dtype, tier):
    x = randn(*shape, scale=4, dtype=dtype)
    x[0, 0] = -100.0  # exp's underflow end
    want = x * torch.sigmoid(1.702 * x)
    assert torch.equal(vision_ops.quick_gelu_(x.clone()), want)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("n, heads, dim", [(1024, 16, 80), (5, 2, 16), (3, 1, 40)])
def test_rotary_equals_apply_rotary_in_float32_bit_for_bit(n, heads, dim, dtype, tier):
    assert_vision_rotary_equals_apply_rotary_in_float32(vision_ops.rotary_, n, heads, dim, dtype=dtype)


# (2, 9001): rows longer than the kernel keeps exps for (SOFTMAX_KEEP), so it computes them again; (3, 9008):
# as long in float32, whose rows the kernel takes in multiples of torch's vector width (others: torch)
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 300, 1024), (1, 3, 17), (4, 1), (2, 9001), (3, 9008)])
def test_softmax_equals_torch_bit_for_bit(shape, dtype, tier):
    scores = randn(*shape, scale=6, seed=4, dtype=dtype)
    want = torch.softmax(scores, -1)
    assert torch.equal(vision_ops.softmax_(scores.clone()), want)


# rows of 1037: 1024 in 16-wide vectors and 13 one by one, or 1032 in 8-wide ones and 5
SCORES = randn(2, 300, 1037, scale=6, seed=4)


@functools.cache
def torch_softmax_under(capability: str) -> tuple[str, torch.Tensor]:
    """(the capability torch ran at, torch.softmax of SCORES) in a new process started with
    ATEN_CPU_CAPABILITY=capability: torch picks its kernels once, at start. ("", None) where that process
    dies: torch 2.13 on an AVX2-only CPU (a Zen 3) runs its AVX-512 kernels when told to, and gets SIGILL."""
    with tempfile.TemporaryDirectory() as d:
        code = ("import sys, torch; torch.save((torch.backends.cpu.get_cpu_capability(), "
                "torch.softmax(torch.load(sys.argv[1]), -1)), sys.argv[2])")
        torch.save(SCORES, f"{d}/in.pt")
        done = subprocess.run([sys.executable, "-c", code, f"{d}/in.pt", f"{d}/out.pt"],
                              env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
        if done.returncode == -signal.SIGILL:
            return "", None
        done.check_returncode()
        return torch.load(f"{d}/out.pt")


@pytest.mark.parametrize("lanes, capability", [(8, "avx2"), (16, "avx512")])
def test_softmax_sums_in_the_order_of_torchs_vector_width(lanes, capability, tier, monkeypatch):
    """torch's softmax changes with its CPU capability (a sum over 16-wide vectors under AVX-512, 8-wide
    under AVX2, whatever our tier): given torch's width, the kernel gives that torch's bits."""
    ran, want = torch_softmax_under(capability)
    if ran.lower() != capability:
        pytest.skip(f"torch can't run at {capability} here")
    if capability == "avx512":  # the two widths give different bits for these scores: the test tells them apart
        assert not torch.equal(want, torch_softmax_under("avx2")[1])
    monkeypatch.setattr(vision_ops, "TORCH_LANES", lanes)
    assert torch.equal(vision_ops.softmax_(SCORES.clone()), want)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])  # float32: how it computes without bf16 matmuls
def test_tower_with_the_kernels_equals_the_torch_tower_bit_for_bit(dtype, monkeypatch, tier):
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=dtype)
    cfg = model.config.vision
    # 2 images: 16 x 16 patches (256: the CPU's matmul attention, where the softmax kernel runs) and 4 x 6
    grid = torch.tensor([[1, 16, 16], [1, 4, 6]])
    pixels = randn(int(grid.prod(-1).sum()), cfg.patch_dim, seed=5, dtype=dtype)
    with torch.inference_mode():
        want = model.visual(pixels, grid)
        model.visual.ops = VisionKernels(vision_ops, vision_ops.supports)
        calls = []
        for name in ("quick_gelu_", "rotary_", "softmax_"):
            fn = getattr(vision_ops, name)
            monkeypatch.setattr(vision_ops, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
        got = model.visual(pixels, grid)
    assert {"quick_gelu_", "rotary_", "softmax_"} <= set(calls)
    assert torch.equal(got, want)
    assert set(model.state_dict()) == set(Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=dtype).state_dict())


def test_without_the_kernels_or_in_float32_the_tower_keeps_the_torch_code(monkeypatch):
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    CpuBackend().prepare(model, None)
    assert model.visual.ops is TORCH_OPS
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
    monkeypatch.setattr(vision_ops, "library", lambda: None)
    CpuBackend().prepare(model, None)
    assert model.visual.ops is TORCH_OPS


def test_a_bf16_tower_computing_in_float32_takes_the_kernels(tier):
    """A bf16 model's tower computes in float32 where the CPU has no bf16 matmuls: with the kernels' float32 forms."""
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
    backend = CpuBackend()
    backend.prepare(model, None)
    assert model.visual.compute_dtype == (BF16 if backend.isa.native_bf16_matmul else torch.float32)
    assert isinstance(model.visual.ops, VisionKernels)
    # SDPA's flash kernel attends to every block with AMX (on the tiles) and in float32 on Intel CPUs; elsewhere
    # big blocks take matmuls
    sdpa = backend.isa.has("amx_bf16") or (model.visual.compute_dtype == torch.float32
                                           and backend.isa.vendor == "GenuineIntel")
    assert model.visual.ops.matmul_min == (0 if sdpa else None)


def test_in_float32_an_intel_cpu_attends_through_sdpa_and_an_amd_one_through_matmuls(monkeypatch):
    """An Ice Lake-like CPU (AVX-512 without BF16: the tower in float32): SDPA's fused kernel for every block
    on Intel, where it measured 1.4-2x the plain matmuls; plain matmuls for big blocks on AMD (not measured)."""
    from qwen2vl.backends.cpu import isa

    if vision_ops.library() is None or not isa.current().has("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        pytest.skip("no AVX-512 vision kernels here")
    ice_lake = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")
    for vendor, matmul_min in (("GenuineIntel", 0), ("AuthenticAMD", None)):
        model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
        backend = CpuBackend()
        backend.isa = isa.capped(ice_lake, None, vendor)
        backend.prepare(model, None)
        assert model.visual.compute_dtype == torch.float32 and model.visual.ops.matmul_min == matmul_min


def test_with_amx_a_bf16_model_attends_through_sdpa_fused(monkeypatch):
    """With AMX, SDPA's fused kernel (on the tiles) takes the tower's attention and the decoder's
    prefill; without, big vision blocks take plain matmuls and prefill SDPA's math path."""
    from qwen2vl.backends.cpu import isa

    if vision_ops.library() is None:
        pytest.skip("no vision kernels here")
    sapphire = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile",
                "amx_bf16", "amx_int8"}
    monkeypatch.setattr(isa.platform, "machine", lambda: "x86_64")
    for flags in (sapphire - {"amx_tile", "amx_bf16", "amx_int8"}, sapphire):
        model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
        backend = CpuBackend()
        backend.isa = isa.capped(flags, None)
        backend.prepare(model, None)
        amx = "amx_bf16" in flags
        assert backend.fused_prefill == amx and model.visual.ops.matmul_min == (0 if amx else None)
    grid = torch.tensor([[1, 16, 16]])  # 256 patches: the matmul path's size
    pixels = randn(256, model.config.vision.patch_dim, seed=5, dtype=BF16)
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a, **k: pytest.fail("took the matmul path"))
    with torch.inference_mode():
        assert model.visual(pixels, grid).isfinite().all()
