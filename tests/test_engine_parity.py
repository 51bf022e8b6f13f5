"""LLM.chat (greedy) against transformers `generate` (greedy), token for token, in float32.

Both run the same random-weight checkpoint (untied head: a tied random model repeats one token,
which would hide position or cache mistakes) on the same processor output. Beyond the ids, each
step's logprob of the chosen token is compared with transformers' raw logits, so a wrong position
or a stale cache slot shows up even where the argmax happens to survive it.
"""

from __future__ import annotations

import pytest

from qwen2vl.engine.llm import LLM
from qwen2vl.engine.sampling_params import SamplingParams
from tests.helpers.parity import CONVERSATIONS, DEVICE, MAX_TOKENS, check, make_checkpoint, reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_ckpt")
    hf = make_checkpoint(folder)
    return folder, hf


@pytest.fixture(scope="module")
def expected(setup, llm):
    _, hf = setup
    return {name: reference(hf, llm, conv) for name, conv in CONVERSATIONS.items()}


@pytest.fixture(scope="module")
def llm(setup):
    folder, _ = setup
    return LLM(str(folder), dtype="float32", device=DEVICE, kv_cache_gib=0.02, block_size=4)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_single_request_matches_transformers(llm, expected, name):
    (out,) = llm.chat(CONVERSATIONS[name], GREEDY)
    check(out, expected[name])
    assert out.usage.completion_tokens == len(out.token_ids)
    assert out.text == llm.processor.decode(out.token_ids)


def test_batch_of_mixed_requests_matches_transformers(llm, expected):
    names = list(CONVERSATIONS)
    outs = llm.chat([CONVERSATIONS[n] for n in names], GREEDY)
    assert len(outs) == len(names)
    for name, out in zip(names, outs):
        check(out, expected[name])


def test_chunked_prefill_and_tiny_cache_match_transformers(setup, expected):
    """Prompt chunks of 5 tokens (cutting through images), and a cache so small that the batch
    must preempt and recompute: the tokens must not change."""
    folder, _ = setup
    # 20 blocks of 4 tokens: each request fits alone (prompts <= ~60 tokens + 8), not all together
    small = LLM(str(folder), dtype="float32", device=DEVICE, block_size=4, max_num_batched_tokens=5,
                enable_prefix_caching=False, kv_cache_gib=20 * 4 * 2 * 2 * 2 * 16 * 4 / 2**30)
    assert small.engine.cache.num_blocks == 20
    encoded = []
    encode = small.engine.runner.encode
    small.engine.runner.encode = lambda items: encoded.extend(items) or encode(items)
    names = list(CONVERSATIONS)
    outs = small.chat([CONVERSATIONS[n] for n in names], GREEDY)
    for name, out in zip(names, outs):
        check(out, expected[name])
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    # each picture encoded once, though its pads were cut into chunks and recomputed after preemption
    assert len(encoded) == 5 == len({it.content_hash for it in encoded})
    assert stats.num_free_blocks == stats.num_blocks


def test_a_fresh_cache_full_of_nan_changes_no_token(setup, expected):
    """The KV cache is allocated uninitialized: fill it with NaN before anything runs, batch every
    conversation (padded decodes of different lengths, prompt chunks) and the tokens must not change."""
    folder, _ = setup
    fresh = LLM(str(folder), dtype="float32", device=DEVICE, kv_cache_gib=0.02, block_size=4,
                max_num_batched_tokens=16)
    fresh.engine.cache.k.fill_(float("nan"))
    fresh.engine.cache.v.fill_(float("nan"))
    names = list(CONVERSATIONS)
    for name, out in zip(names, fresh.chat([CONVERSATIONS[n] for n in names], GREEDY)):
        check(out, expected[name])


def test_prefix_cache_hit_keeps_tokens(llm, expected):
    """The second turn of a conversation reuses the first turn's blocks (image included)."""
    first = CONVERSATIONS["multi_turn"][:1]
    llm.chat(first, GREEDY)
    before = llm.engine.stats()
    (out,) = llm.chat(CONVERSATIONS["multi_turn"], GREEDY)
    after = llm.engine.stats()
    assert out.usage.cached_tokens > 0
    assert after.prefix_cache_hits > before.prefix_cache_hits
    check(out, expected["multi_turn"])
