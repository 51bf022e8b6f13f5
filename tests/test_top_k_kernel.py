"""The CPU top-k kernel (csrc/top_k.c) against torch.topk at every tier this machine can play, and the
sampler drawing the same tokens through it as through the torch version."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.cpu import sample_ops
from qwen2vl.backends.cpu.backend import CpuBackend
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampler import Sampler
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence
from tests.helpers.tiers import tier_fixture

tier = tier_fixture(lambda: sample_ops.library() is not None)


def make_seq(params: SamplingParams, seed: int) -> Sequence:
    return Sequence("r", Prompt([1, 2, 3], [], torch.zeros(3, 3, dtype=torch.long), 0), params, 0, seed)


def rows(vocab: int, seed: int) -> torch.Tensor:
    """Peaked, flat and masked rows, and one with equal values (ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, vocab, generator=g) * torch.tensor([[4.0], [1.0], [0.01], [2.0], [2.0], [1.0]])
    x[3, torch.randperm(vocab, generator=g)[: vocab // 2]] = float("-inf")  # half the vocabulary masked
    x[4, : vocab // 3] = float("-inf")
    x[5] = torch.randint(0, 4, (vocab,), generator=g).float()  # few values: ties everywhere
    return x


@pytest.mark.parametrize("vocab, k", [(151936, 1), (151936, 50), (151936, 256), (20000, 7), (1000 * 128 + 37, 20)])
def test_kernel_equals_torch_topk(vocab, k, tier):
    x = rows(vocab, seed=k)
    assert sample_ops.supports(x, k)
    values, columns = sample_ops.top_k(x, k)
    want_values, want_columns = x.topk(k)
    torch.testing.assert_close(values, want_values, rtol=0, atol=0)
    assert torch.equal(x.gather(1, columns), values)
    assert columns[:5].tolist() == want_columns[:5].tolist()  # no ties in the first five rows
    tied = columns[5].tolist()  # ties: the smaller column first, each column once
    assert len(set(tied)) == k
    assert all(a < b for a, b, va, vb in zip(tied, tied[1:], values[5], values[5, 1:]) if va == vb)
    strided = torch.cat([x, x], dim=1)[:, :vocab]  # rows apart in memory
    assert torch.equal(sample_ops.top_k(strided, k)[1], columns)


def test_cpu_backend_falls_back_where_the_kernel_does_not_apply():
    x = rows(151936, seed=0)
    cpu, ref = CpuBackend(), TorchBackend()
    # a small vocabulary, float64, a k past a quarter of the blocks
    for arg, k in ((x[:, :500], 3), (x.double(), 5), (x, 400)):
        assert not sample_ops.supports(arg, k)
        assert all(torch.equal(a, b) for a, b in zip(cpu.top_k(arg, k), ref.top_k(arg, k)))


def test_sampler_draws_the_same_through_the_kernel(tier):
    """Top-k rows take the kernel; a row without top-k uses it for top-p's candidates."""
    params = [SamplingParams(temperature=1.3, top_p=0.5, min_p=0.01),
              SamplingParams(temperature=0.7, top_k=50, top_p=0.9), SamplingParams(temperature=1.0, top_k=5)]
    x = rows(40000, seed=3)[:3].repeat(8, 1)  # [24, V]: peaked, normal and flat rows
    seqs = [make_seq(params[i % 3], seed=i) for i in range(24)]
    ours = Sampler(torch.device("cpu"), CpuBackend().top_k)(x.clone(), seqs)[0]
    assert ours == Sampler(torch.device("cpu"), TorchBackend().top_k)(x.clone(), seqs)[0]
