"""The engine on a CUDA device (skipped without one). The full parity suite also runs there with
QWEN2VL_TEST_DEVICE=cuda; this file adds what only a GPU has: cache sizing from
gpu_memory_utilization, bf16 on the card against the CPU engine, and the attention paths on CUDA."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.backends.paged_attention import decode, varlen
from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from tests.helpers.paged_cache import build
from tests.helpers.parity import CONVERSATIONS, make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_cuda_ckpt")
    make_checkpoint(folder)
    return folder


def to_cuda(q, k, v, cache, batch, want):
    cache.k, cache.v = cache.k.cuda(), cache.v.cuda()
    for name in ("slot_mapping", "ctx_slots", "ctx_lens_t"):
        setattr(batch, name, getattr(batch, name).cuda())
    return q.cuda(), k.cuda(), v.cuda(), cache, batch, want.cuda()


def test_attention_paths_on_cuda():
    q, k, v, cache, batch, want = to_cuda(*build([0, 9, 3, 12], [5, 1, 4, 1]))
    torch.testing.assert_close(varlen(q, k, v, cache.k[0], cache.v[0], batch), want)
    q, k, v, cache, batch, want = to_cuda(*build([0, 13, 3, 30], [1, 1, 1, 1], seed=1))
    torch.testing.assert_close(decode(q, cache.k[0], cache.v[0], batch), want)


def test_cache_sized_from_gpu_memory_utilization(folder):
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
    free, total = torch.cuda.mem_get_info()
    used_by_cache = llm.engine.cache.k.numel() * 2 * 2
    assert 0.1 * total < used_by_cache < 0.3 * total
    (out,) = llm.chat(CONVERSATIONS["one_image"], SamplingParams(temperature=0, max_tokens=4))
    assert len(out.token_ids) == 4


def test_bf16_cuda_batch_agrees_with_cpu_engine(folder):
    """bf16 rounds differently on the two devices; most greedy tokens must still agree."""
    params = SamplingParams(temperature=0, max_tokens=8)
    convs = list(CONVERSATIONS.values())
    gpu = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_gib=0.05, block_size=4)
    cpu = LLM(str(folder), dtype="bfloat16", device="cpu", kv_cache_gib=0.05, block_size=4)
    a, b = gpu.chat(convs, params), cpu.chat(convs, params)
    same = sum(x == y for oa, ob in zip(a, b) for x, y in zip(oa.token_ids, ob.token_ids))
    assert same >= 0.8 * sum(len(o.token_ids) for o in a)
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=11)
    assert gpu.chat(convs[0], seeded)[0].token_ids == gpu.chat(convs[0], seeded)[0].token_ids
