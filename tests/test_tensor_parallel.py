"""Tensor parallelism (qwen2vl/parallel/): two gloo ranks on the CPU give one process's answers.

At float32 the split changes only the order of sums, so greedy answers match token for token and
logits within round-off. At bf16 each rank rounds its partial sums, so the kernel-path test
(FastLinear, int8 per shard) holds the logits to a looser, still discriminating bound.
"""

from __future__ import annotations

import gc
import os
import signal

import pytest
import torch
from openai import APIStatusError, OpenAI

from qwen2vl.config import TextConfig
from qwen2vl.engine.async_engine import AsyncLLM
from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.loader import read_tensors
from qwen2vl.parallel.group import WorkerDied
from qwen2vl.parallel.plan import ShardPlan, check_tensor_parallel, rank_config
from qwen2vl.server.limits import ServerLimits
from tests.helpers.parity import CONVERSATIONS, make_checkpoint
from tests.helpers.server import running_server

GREEDY = SamplingParams(temperature=0, max_tokens=8)
CASES = ["text", "one_image", "two_images", "video"]
ARGS = dict(kv_cache_gib=0.02, block_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp_ckpt")
    make_checkpoint(folder)  # 4 heads, 2 KV heads, MLP width 96: two ranks hold 2, 1 and 48 each
    return folder


@pytest.fixture(scope="module")
def one_kv_head(tmp_path_factory):
    """A checkpoint with 1 KV head, which 2 ranks both hold, and one bf16 process on it."""
    folder = tmp_path_factory.mktemp("tp_kv1")
    make_checkpoint(folder, num_kv_heads=1)
    return folder, LLM(str(folder), dtype="bfloat16", **ARGS)


@pytest.mark.parametrize("quantization, linear", [(None, "FastLinear"), ("int8", "Int8Linear")])
def test_replicated_kv_head_and_cpu_kernels_per_shard_then_close_on_collection(one_kv_head, quantization, linear):
    # first: one tensor-parallel model per process (one torch.distributed group), and `two` lives on.
    # bf16 runs the CPU backend's kernels on each shard; its partial sums round to bf16 before the all-reduce,
    # and int8 row-parallel shards have their own per-channel scales: close to one process, not equal
    folder, one = one_kv_head
    two = LLM(str(folder), dtype="bfloat16", quantization=quantization, tensor_parallel_size=2, **ARGS)
    procs = list(two.tp.procs)
    assert type(two.model.model.layers[0].mlp.down_proj.linear).__name__ == linear  # under RowParallel
    inputs = one.processor(CONVERSATIONS["one_image"], add_generation_prompt=True)
    want, got = one.model.logits(**inputs), two.model.logits(**inputs)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos(got, want).min() > 0.999  # measured 0.9997 with int8
    assert cos(want[1:], want[:-1]).max() < 0.99  # measured 0.95: the bound tells one position from the next
    assert len(two.generate([list(range(20, 40))], GREEDY)[0].token_ids) == 8  # decode on the per-shard kernels
    del two
    gc.collect()
    assert not any(p.is_alive() for p in procs)


@pytest.fixture(scope="module")
def one(folder):
    return LLM(str(folder), dtype="float32", **ARGS)


@pytest.fixture(scope="module")
def two(folder):
    two = LLM(str(folder), dtype="float32", tensor_parallel_size=2, **ARGS)
    yield two
    two.close()


def test_greedy_answers_equal_one_process_alone_and_batched(one, two):
    convs = [CONVERSATIONS[c] for c in CASES]
    want = [o.token_ids for o in one.chat(convs, GREEDY)]
    assert [two.chat(c, GREEDY)[0].token_ids for c in convs] == want  # alone
    assert [o.token_ids for o in two.chat(convs, GREEDY)] == want  # batched, prefill and decode mixed
    s = two.engine.stats()
    assert s.num_free_blocks == s.num_blocks


def test_logits_and_embeddings_within_float32_round_off(one, two):
    for case in ("two_images", "video"):
        inputs = one.processor(CONVERSATIONS[case], add_generation_prompt=True)
        want = one.model.logits(**inputs)
        got = two.model.logits(**inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    inputs = ["a cat", {"messages": CONVERSATIONS["one_image"]}, "a dog on a mat"]  # packed, cache-free forward
    torch.testing.assert_close(two.embed(inputs), one.embed(inputs), rtol=1e-5, atol=1e-5)


def test_ranks_hold_their_share():
    cfg = TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    local = rank_config(cfg, 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size, local.head_dim) == \
        (2, 1, 48, 16)
    plan = ShardPlan(cfg, 1, 2)
    assert plan.slice("model.layers.0.self_attn.q_proj.weight") == (0, 32, 64)
    assert plan.slice("model.layers.0.self_attn.k_proj.bias") == (0, 16, 32)
    assert plan.slice("model.layers.3.mlp.up_proj.weight") == (0, 48, 96)
    assert plan.slice("model.layers.0.self_attn.o_proj.weight") == (1, 32, 64)
    assert plan.slice("model.layers.0.mlp.down_proj.weight") == (1, 48, 96)
    assert plan.slice("model.layers.0.input_layernorm.weight") is None
    assert plan.keeps("model.norm.weight") and not plan.keeps("lm_head.weight")
    assert not plan.keeps("model.embed_tokens.weight") and not plan.keeps("visual.blocks.0.attn.qkv.weight")
    assert ShardPlan(cfg, 0, 2).keeps("visual.blocks.0.attn.qkv.weight")
    # fewer KV heads than ranks: each rank takes the KV head its query heads share
    kv = [ShardPlan(cfg, r, 4).slice("model.layers.0.self_attn.v_proj.weight") for r in range(4)]
    assert kv == [(0, 0, 16), (0, 0, 16), (0, 16, 32), (0, 16, 32)]


@pytest.mark.parametrize("n, words", [(3, "3 does not divide the model's 4 attention heads"),
                                      (0, "an int >= 1")])
def test_a_size_that_does_not_split_the_model_is_refused(folder, n, words):
    with pytest.raises(ValueError, match=words):
        LLM(str(folder), dtype="float32", tensor_parallel_size=n, **ARGS)


@pytest.mark.parametrize("heads, kv, width, n, words", [
    (6, 2, 96, 3, "3 and the model's 2 KV heads"),
    (4, 2, 90, 4, "4 does not divide the MLP width"),
])
def test_check_names_the_numbers(heads, kv, width, n, words):
    cfg = TextConfig(hidden_size=16 * heads, num_attention_heads=heads, num_key_value_heads=kv,
                     intermediate_size=width)
    with pytest.raises(ValueError, match=words):
        check_tensor_parallel(cfg, n)


def test_a_shard_reads_only_its_slice(folder):
    file = next(folder.glob("*.safetensors"))
    for name, read in read_tensors(file):  # read() works while its file is open: inside the loop
        if name.endswith("layers.0.mlp.down_proj.weight"):
            full = read()
            assert torch.equal(read((1, 48, 96)), full[:, 48:]) and torch.equal(read((0, 3, 7)), full[3:7])
            with pytest.raises(ValueError, match="no slice 90:100 on dim 1"):
                read((1, 90, 100))
            return
    raise AssertionError("no down_proj in the checkpoint")


def test_a_dead_rank_stops_the_server_with_503_naming_it(two):
    engine = AsyncLLM.from_llm(two)
    with running_server(ServerLimits(), api_key=None, engine=engine) as (url, _):
        (proc,) = two.tp.procs
        os.kill(proc.pid, signal.SIGKILL)
        assert engine.failed.wait(10)  # what makes `qwen2vl serve` exit (server/cli.py)
        assert f"rank 1 (pid {proc.pid}) exited with code -9" in engine.failure
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(APIStatusError) as info:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.status_code == 503 and f"rank 1 (pid {proc.pid}) exited" in info.value.body["message"]
        with pytest.raises(WorkerDied, match="rank 1"):
            two.generate([[1, 2, 3]], GREEDY)
    assert not any(p.is_alive() for p in two.tp.procs)  # the engine's shutdown closed the LLM
    with pytest.raises(RuntimeError, match="was closed"):
        two.generate([[1, 2, 3]], GREEDY)
