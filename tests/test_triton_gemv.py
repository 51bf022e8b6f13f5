"""The CUDA decode GEMV (qwen2vl/kernels/triton_gemv.py, cuda_linear.GemvLinear) against F.linear.
Without a GPU it runs in Triton's interpreter on the CPU (tests/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from qwen2vl import Qwen2VL  # noqa: E402
from qwen2vl.cuda_linear import GemvLinear, speed_up_cuda_linears  # noqa: E402
from qwen2vl.kernels import triton_gemv  # noqa: E402
from qwen2vl.linear import replace_linears  # noqa: E402
from tests.helpers.checkpoints import build_reference, save_checkpoint  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(BF16).to(DEVICE)


def assert_within_a_bf16_rounding(got, x, w, b):
    """got is F.linear in float32 rounded once to bf16, give or take float32's order of summation."""
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == BF16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-3)


# one K step and partial row blocks; several K steps with a partial last one; K a power of two
@pytest.mark.parametrize("n, k", [(37, 200), (9, 4100), (16, 2048), (1, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_is_f_linear_rounded_once(n, k, bias):
    x, w, b = randn(1, k, seed=1), randn(n, k, seed=2), randn(n, seed=3) if bias else None
    assert_within_a_bf16_rounding(triton_gemv.gemv(x, w, b), x, w, b)


@pytest.mark.parametrize("block", [(1, 64, 1), (8, 256, 2), (2, 4096, 4)])
def test_every_block_config_computes_the_same_product(block):
    x, w, b = randn(1, 1000, seed=4), randn(21, 1000, seed=5), randn(21, seed=6)
    assert_within_a_bf16_rounding(triton_gemv.gemv(x, w, b, block=block), x, w, b)


def test_the_load_time_check_passes():
    triton_gemv.check(torch.device(DEVICE))


def test_gemv_linear_takes_single_rows_and_leaves_the_rest_to_f_linear():
    linear = torch.nn.Linear(300, 50).to(DEVICE, BF16)
    fast = GemvLinear(linear, triton_gemv)
    assert fast.weight is linear.weight and fast.bias is linear.bias  # parameters shared, not copied
    rows = randn(3, 300, seed=7)
    assert torch.equal(fast(rows), linear(rows))  # several rows: F.linear itself
    assert_within_a_bf16_rounding(fast(rows[:1]), rows[:1], linear.weight, linear.bias)
    assert_within_a_bf16_rounding(fast(rows[1]), rows[1], linear.weight, linear.bias)  # [K] as well


def test_a_model_with_gemv_linears_keeps_its_weights_and_its_logits(tmp_path):
    model = Qwen2VL.from_pretrained(save_checkpoint(build_reference(), tmp_path), dtype=BF16, device=DEVICE)
    model.fuse_qkv()
    keys = model.state_dict().keys()
    ids = torch.tensor([17, 230, 5], device=DEVICE)
    want = [model.logits(ids[i : i + 1]) for i in range(3)]  # one-token sequences: every linear gets one row
    logits_before_swap = model.logits(ids)
    # speed_up_cuda_linears without its device check, so the interpreter runs it here
    swapped = replace_linears(model, lambda linear: GemvLinear(linear, triton_gemv), skip=("visual",))
    assert swapped == 2 * 5 + 1  # per layer qkv, o, gate, up, down; and the head
    assert model.state_dict().keys() == keys
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for i in range(3):
        torch.testing.assert_close(model.logits(ids[i : i + 1]), want[i], rtol=0.02, atol=0.02)
    assert torch.equal(model.logits(ids), logits_before_swap)  # prefill rows: cuBLAS / F.linear as before


def test_speed_up_cuda_linears_leaves_cpu_models_alone(tmp_path):
    model = Qwen2VL.from_pretrained(save_checkpoint(build_reference(), tmp_path), dtype=BF16, device="cpu")
    assert speed_up_cuda_linears(model) == 0
    assert not any(isinstance(m, GemvLinear) for m in model.modules())
