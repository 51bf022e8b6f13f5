"""The vision tower's Triton kernels (qwen2vl/backends/cpu/csrc/triton_vision_ops.py, CUDA's counterpart of
vision_ops) against the torch code they replace, and a tower running them. Without a GPU they run
in Triton's interpreter on the CPU (tests/conftest.py)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.backends.cuda import triton_kernels  # noqa: E402
from qwen2vl.backends.cuda import triton_vision_ops as ops  # noqa: E402
from qwen2vl.backends.kernel_ops import VisionKernels  # noqa: E402
from tests.helpers.checkpoints import build_reference, save_checkpoint  # noqa: E402
from tests.helpers.layer_op_checks import assert_vision_rotary_equals_apply_rotary_in_float32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16


def randn(*shape, scale=1.0, seed=0, dtype=BF16):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", [(64, 5120), (3, 7), (1, 1)])
def test_quick_gelu_matches_torch(shape):
    x = randn(*shape, scale=4)
    x[0, 0] = -100.0  # exp's underflow end
    want = x * torch.sigmoid(1.702 * x)
    got = ops.quick_gelu_(x.clone())
    torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-6)  # exp may differ in its last float32 bit
    assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("n, heads, dim", [(64, 16, 80), (5, 2, 16), (3, 1, 40)])
def test_rotary_equals_apply_rotary_in_float32_bit_for_bit(n, heads, dim):
    assert_vision_rotary_equals_apply_rotary_in_float32(ops.rotary_, n, heads, dim, DEVICE)


def test_the_load_time_check_passes():
    ops.check(torch.device(DEVICE))


def test_tower_on_the_triton_kernels_matches_the_torch_tower(monkeypatch, tmp_path):
    model = Qwen2VL.from_pretrained(save_checkpoint(build_reference(), tmp_path), dtype=BF16, device=DEVICE)
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])  # two images: block-diagonal attention
    pixels = randn(int(grid.prod(-1).sum()), model.config.vision.patch_dim, seed=5)
    calls = []
    for name in ("quick_gelu_", "rotary_"):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    with torch.inference_mode():
        want = model.visual(pixels, grid)
        model.visual.ops = VisionKernels(ops, lambda x: True)  # the CUDA backend's choice, here on any device
        got = model.visual(pixels, grid)
    assert {"quick_gelu_", "rotary_"} <= set(calls)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)


def test_the_kernels_load_only_when_their_check_passes(monkeypatch, caplog):
    def wrong(device):
        raise AssertionError("wrong numbers")

    triton_kernels.cache_clear()
    try:
        assert triton_kernels("triton_vision_ops", torch.device(DEVICE)) is ops  # the check passes here
        triton_kernels.cache_clear()
        monkeypatch.setattr(ops, "check", wrong)
        assert triton_kernels("triton_vision_ops", torch.device(DEVICE)) is None  # the torch code stays
        assert "triton_vision_ops unavailable" in caplog.text and "wrong numbers" in caplog.text
    finally:
        triton_kernels.cache_clear()
