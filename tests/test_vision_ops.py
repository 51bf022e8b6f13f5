"""The vision tower's C kernels (qwen2vl/backends/cpu/csrc/vision_ops.c) against the torch code they replace,
and a tower using them (the CPU backend's VisionKernels) against one that doesn't: equal bit for bit."""

import pytest
import torch

from qwen2vl import Qwen2VL
from qwen2vl.backends.cpu import vision_ops
from qwen2vl.backends.cpu.backend import CpuBackend
from qwen2vl.backends.kernel_ops import VisionKernels
from qwen2vl.backends.reference import TORCH_OPS
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.layer_op_checks import assert_vision_rotary_equals_apply_rotary_in_float32

pytestmark = pytest.mark.skipif(vision_ops.library() is None, reason="vision kernels can't be built or run here")
BF16 = torch.bfloat16


def randn(*shape, scale=1.0, seed=0, dtype=BF16):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("shape", [(1024, 5120), (3, 7), (1, 1)])
def test_quick_gelu_equals_torch_bit_for_bit(shape):
    x = randn(*shape, scale=4)
    x[0, 0] = -100.0  # exp's underflow end
    want = x * torch.sigmoid(1.702 * x)
    assert torch.equal(vision_ops.quick_gelu_(x.clone()), want)


@pytest.mark.parametrize("n, heads, dim", [(1024, 16, 80), (5, 2, 16), (3, 1, 40)])
def test_rotary_equals_apply_rotary_in_float32_bit_for_bit(n, heads, dim):
    assert_vision_rotary_equals_apply_rotary_in_float32(vision_ops.rotary_, n, heads, dim)


@pytest.mark.parametrize("shape", [(2, 300, 1024), (1, 3, 17), (4, 1)])
def test_softmax_equals_torch_bit_for_bit(shape):
    scores = randn(*shape, scale=6, seed=4)
    want = torch.softmax(scores, -1)
    assert torch.equal(vision_ops.softmax_(scores.clone()), want)


def test_tower_with_the_kernels_equals_the_torch_tower_bit_for_bit(monkeypatch):
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
    cfg = model.config.vision
    # 2 images: 16 x 16 patches (256: the CPU's matmul attention, where the softmax kernel runs) and 4 x 6
    grid = torch.tensor([[1, 16, 16], [1, 4, 6]])
    pixels = randn(int(grid.prod(-1).sum()), cfg.patch_dim, seed=5)
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
    assert set(model.state_dict()) == set(Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16).state_dict())


def test_without_the_kernels_or_in_float32_the_tower_keeps_the_torch_code(monkeypatch):
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    CpuBackend().prepare(model, None)
    assert model.visual.ops is TORCH_OPS
    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=BF16)
    monkeypatch.setattr(vision_ops, "library", lambda: None)
    CpuBackend().prepare(model, None)
    assert model.visual.ops is TORCH_OPS
