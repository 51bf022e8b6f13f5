"""block_diagonal_attention: each block attends only within itself, on both CPU paths."""

import pytest
import torch
import torch.nn.functional as F

import qwen2vl.attention as attention
from qwen2vl.attention import CPU_MATMUL_ATTENTION_MIN, block_diagonal_attention


def reference(q, k, v, cu_seqlens):
    """Full attention with an explicit block-diagonal mask, in float64."""
    n = q.shape[0]
    block = torch.zeros(n, dtype=torch.long)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        block[start:end] = i
    mask = block[:, None] == block[None, :]
    q, k, v = (x.double().transpose(0, 1) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


# a small block (SDPA), one over the threshold (matmul path), one more small block
SIZES = [40, CPU_MATMUL_ATTENTION_MIN + 44, 64]


def qkv(dtype, heads=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    return [torch.randn(n, heads, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("budget", [1 << 22, 1000])  # 1000: forces slabs of 64 query rows
def test_matches_masked_attention_fp32(monkeypatch, budget):
    monkeypatch.setattr(attention, "_SCORES_BUDGET", budget)
    q, k, v = qkv(torch.float32)
    cu = [0, SIZES[0], SIZES[0] + SIZES[1], sum(SIZES)]
    out = block_diagonal_attention(q, k, v, cu)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_matmul_path_is_taken_and_close_in_bf16(monkeypatch):
    calls = []
    real = attention._matmul_attention
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    q, k, v = qkv(torch.bfloat16)
    cu = [0, SIZES[0], SIZES[0] + SIZES[1], sum(SIZES)]
    out = block_diagonal_attention(q, k, v, cu)
    assert calls == [SIZES[1]]
    ref = reference(q, k, v, cu)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


@pytest.mark.parametrize("one_block", [False, True])
def test_matmul_min_zero_sends_every_block_to_sdpa(monkeypatch, one_block):
    """What the CPU backend asks for with AMX (VisionKernels.matmul_min = 0): no block by matmuls,
    the big one (alone, or among others) through SDPA, the same values."""
    monkeypatch.setattr(attention, "_matmul_attention", lambda *a, **k: pytest.fail("took the matmul path"))
    q, k, v = qkv(torch.float32)
    cu = [0, SIZES[1]] if one_block else [0, SIZES[0], SIZES[0] + SIZES[1], sum(SIZES)]
    q, k, v = (x[: cu[-1]] for x in (q, k, v))
    out = block_diagonal_attention(q, k, v, cu, matmul_min=0)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_blocks_of_one_length_go_together_and_match(monkeypatch):
    """Windows as Qwen2.5-VL cuts them (many of a few lengths, some over the CPU matmul threshold):
    one SDPA call per length, and the same values as masked attention."""
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape[0])
                        or real(q, *a, **kw))
    sizes = [64, 64, 32, 64, CPU_MATMUL_ATTENTION_MIN, 32, 16, 64]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(sizes), 3, 8, generator=g) for _ in range(3))
    cu = [0]
    for n in sizes:
        cu.append(cu[-1] + n)
    out = block_diagonal_attention(q, k, v, cu)
    assert sorted(calls) == [1, 2, 4]  # 16 alone, 32 twice, 64 four times; the big block by matmuls
    torch.testing.assert_close(out.double(), reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_one_masked_call_gives_what_a_call_per_block_gives(monkeypatch):
    """On a GPU many blocks go through one SDPA call under an N x N mask (attention.masked_attention):
    the vision tower's blocks of several lengths, and a training batch's packed rows (causal, GQA),
    the same values and gradients as the call per block the CPU makes. The GPU's switch is forced here."""
    g = torch.Generator().manual_seed(2)
    sizes = [40, 7, 64, 33]
    cu = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    q, k, v = (torch.randn(sum(sizes), 4, 8, generator=g) for _ in range(3))
    per_block = block_diagonal_attention(q, k, v, cu)
    monkeypatch.setattr(attention, "_one_masked_call", lambda q: True)
    torch.testing.assert_close(block_diagonal_attention(q, k, v, cu), per_block, atol=1e-6, rtol=1e-6)

    def run(masked: bool):
        monkeypatch.setattr(attention, "_one_masked_call", lambda q: masked)
        leaves = [x.clone().requires_grad_() for x in (q, k[:, :2], v[:, :2])]  # 4 query heads, 2 KV heads
        out = attention.packed_causal_attend(cu)(0, *leaves)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out, [x.grad for x in leaves]

    (out, grads), (expected, expected_grads) = run(True), run(False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
