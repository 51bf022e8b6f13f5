"""The decoder's Triton layer kernels (qwen2vl/backends/cpu/csrc/triton_layer_ops.py, CUDA's counterpart of
layer_ops) against the torch code they replace. Without a GPU they run in Triton's interpreter on
the CPU: the same kernels and indexing, numpy's arithmetic."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")  # interpreted on the CPU: tests/conftest.py

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.backends.cuda import triton_layer_ops as ops  # noqa: E402
from qwen2vl.backends.kernel_ops import TextKernels  # noqa: E402
from qwen2vl.text import RMSNorm  # noqa: E402
from tests.helpers.checkpoints import build_reference, save_checkpoint  # noqa: E402
from tests.helpers.layer_op_checks import assert_rotary_in_place_equals_apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16


def randn(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16).to(DEVICE)


@pytest.mark.parametrize("n, d", [(1, 1536), (5, 64), (3, 100)])
def test_add_rms_norm_matches_residual_add_then_rmsnorm(n, d):
    norm = RMSNorm(d, 1e-6).to(DEVICE, BF16)
    norm.weight.data = randn(d, seed=1)
    x, residual = randn(n, d, scale=3, seed=2), randn(n, d, scale=10, seed=3)
    out, total = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(total, residual + x)  # the add rounds once, as torch's
    torch.testing.assert_close(out, norm(residual + x), rtol=2**-7, atol=1e-6)  # the sum's order may differ
    out, same = ops.add_rms_norm(x, None, norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(x), rtol=2**-7, atol=1e-6)
    assert same is x


@pytest.mark.parametrize("n, heads, kv_heads, dim", [(1, 12, 2, 128), (7, 4, 2, 16), (3, 3, 1, 40)])
def test_rotary_in_place_equals_apply_rotary_bit_for_bit(n, heads, kv_heads, dim):
    assert_rotary_in_place_equals_apply_rotary(ops.rotary_, n, heads, kv_heads, dim, DEVICE)


@pytest.mark.parametrize("n, i", [(1, 8960), (3, 100), (2, 1500)])
def test_silu_mul_matches_torch(n, i):
    gate_up = randn(n, 2 * i, scale=4, seed=6)  # a fused gate|up output, read through strided views
    gate, up = gate_up.split(i, 1)
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, rtol=2**-7, atol=1e-6)


def test_write_kv_equals_two_index_copies():
    kv = randn(7, 3 * 2 * 16, seed=7)  # [q | k | v] heads side by side, as the qkv output
    k, v = kv[:, 32:64].view(7, 2, 16), kv[:, 64:].view(7, 2, 16)
    slots = torch.tensor([9, 0, 3, 15, 4, 8, 1], device=DEVICE)
    got = [torch.zeros(4, 4, 2, 16, dtype=BF16, device=DEVICE) for _ in "kv"]
    want = [t.clone() for t in got]
    assert ops.write_kv(k, v, *got, slots)
    for cache, new in zip(want, (k, v)):
        cache.view(-1, 2, 16).index_copy_(0, slots, new)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not ops.write_kv(k.transpose(1, 2), v, *got, slots)  # a layout it doesn't take: left to torch


@pytest.mark.parametrize("fuse_gate_up", [False, True])
def test_the_load_time_check_passes_and_a_model_runs_on_the_triton_ops(monkeypatch, tmp_path, fuse_gate_up):
    ops.check(torch.device(DEVICE))
    model = Qwen2VL.from_pretrained(save_checkpoint(build_reference(), tmp_path), dtype=BF16, device=DEVICE)
    model.fuse_qkv()
    ids = torch.randint(0, 200, (17,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want = model.logits(ids)
    if fuse_gate_up:  # as load_model does on CUDA; the torch forward takes the fused layout too
        model.fuse_gate_up()
        torch.testing.assert_close(model.logits(ids), want, rtol=0.02, atol=0.02)
    model.model.ops = TextKernels(ops, lambda x: True)  # the CUDA backend's choice, here on any device
    got = model.logits(ids)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
