"""Block manager and scheduler without a model: allocation, prefix hashing, chunking, preemption."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.prompt import Prompt, VisionItem
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.scheduler import Scheduler
from qwen2vl.engine.sequence import Sequence, Status

PAD = 99


def prompt(ids, images=()) -> Prompt:
    """Ids with (offset, length, content hash) images; positions are irrelevant here."""
    vision = [VisionItem("image", torch.zeros(4 * n, 1), (1, 2, 2 * n), h, off, n) for off, n, h in images]
    return Prompt(list(ids), vision, torch.zeros(3, len(ids), dtype=torch.long), 0)


def seq(ids, images=(), max_tokens=4, request_id="r", index=0) -> Sequence:
    return Sequence(request_id, prompt(ids, images), SamplingParams(max_tokens=max_tokens), index)


def computed(bm: BlockManager, s: Sequence) -> None:
    """Pretend the model filled the cache for the whole sequence."""
    bm.cache_blocks(s, s.num_cached_tokens, s.num_tokens)
    s.num_cached_tokens = s.num_tokens


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    b = seq(range(100, 121))  # needs 6 blocks, only 5 free: refused, nothing changed
    assert not bm.allocate(b) and bm.num_free_blocks == 5 and not b.block_table
    bm.free_seq(a)
    assert bm.num_free_blocks == 8 and bm.ref_counts == [0] * 8 and not a.block_table


def test_append_takes_a_block_only_at_a_block_boundary():
    bm = BlockManager(4, 4)
    s = seq(range(4))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.append_token(1)
    assert bm.can_append(s)
    bm.append(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    s.append_token(2)
    bm.append(s)
    assert len(s.block_table) == 2


@pytest.mark.parametrize(
    "first, second, hit_tokens",
    [
        ((range(10), ()), (range(10), ()), 8),  # same tokens: both full blocks (never the last token)
        ((range(12), ()), (range(12), ()), 8),  # exact multiple: the last block is left to compute
        ((range(10), ()), ([0, 1, 2, 3, 9, 9, 9, 9, 8, 9], ()), 4),  # diverges in block 1
        (([1, 2, PAD, PAD, PAD, PAD, 7, 8, 9], [(2, 4, 111)]), ([1, 2, PAD, PAD, PAD, PAD, 7, 8, 9], [(2, 4, 111)]), 8),
        # same ids, different picture: the pads' blocks must miss
        (([1, 2, PAD, PAD, PAD, PAD, 7, 8, 9], [(2, 4, 111)]), ([1, 2, PAD, PAD, PAD, PAD, 7, 8, 9], [(2, 4, 222)]), 0),
        # the picture starts in block 1: block 0 (text only) still hits
        (([1, 2, 3, 4, 5, PAD, PAD, 8, 9], [(5, 2, 111)]), ([1, 2, 3, 4, 5, PAD, PAD, 8, 9], [(5, 2, 222)]), 4),
    ],
)
def test_prefix_hits_need_same_tokens_and_same_pictures(first, second, hit_tokens):
    bm = BlockManager(16, 4)
    a = seq(*first)
    bm.allocate(a)
    computed(bm, a)
    b = seq(*second)
    bm.allocate(b)
    assert b.num_cached_tokens == hit_tokens
    shared = hit_tokens // 4
    assert b.block_table[:shared] == a.block_table[:shared]
    assert all(bm.ref_counts[x] == 2 for x in b.block_table[:shared])
    assert not set(b.block_table[shared:]) & set(a.block_table)
    assert bm.prefix_hits == hit_tokens


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, 4)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    bm.free_seq(a)
    b = seq(range(9))
    assert bm.allocate(b) and b.num_cached_tokens == 8  # revived from the free list
    bm.free_seq(b)
    c = seq(range(50, 66))  # takes every block: the old prefix is overwritten and forgotten
    assert bm.allocate(c)
    bm.free_seq(c)
    d = seq(range(9))
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def run(sched: Scheduler, max_steps=500) -> list[list[Sequence]]:
    """Drive the scheduler with a fake model that always samples token 7."""
    steps = []
    while sched.has_work():
        seqs = sched.schedule()
        assert seqs, "the scheduler stalled"
        tokens = [7 if s.num_cached_tokens + s.num_scheduled_tokens == s.num_tokens else None for s in seqs]
        steps.append([(s, s.num_scheduled_tokens) for s in seqs])
        sched.postprocess(seqs, tokens)
        assert len(steps) < max_steps
    return steps


def test_chunked_prefill_respects_budget_and_puts_decodes_first():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=6, max_model_len=64, eos_token_ids=[])
    short, long = seq(range(3), max_tokens=6), seq(range(100, 120), max_tokens=2)
    sched.add(short)
    sched.add(long)
    steps = run(sched)
    assert all(sum(n for _, n in step) <= 6 for step in steps)
    # step 0: short's whole prompt (3) + 3 of long's; then short decodes first in every step
    assert [(s is short, n) for s, n in steps[0]] == [(True, 3), (False, 3)]
    for step in steps[1:]:
        if len(step) == 2:
            assert step[0][0] is short and step[0][1] == 1
    assert short.completion_token_ids == [7] * 6 and long.completion_token_ids == [7] * 2
    assert bm.num_free_blocks == 64


def test_preemption_under_a_tiny_cache_loses_no_request():
    bm = BlockManager(6, 4)  # 24 slots; each sequence needs up to 5 + 10 = 15
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=24, eos_token_ids=[])
    seqs = [seq(range(i, i + 5), max_tokens=10, request_id=str(i)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run(sched)
    assert sched.num_preemptions > 0
    assert all(s.is_finished and s.finish_reason == "length" and s.num_completion_tokens == 10 for s in seqs)
    assert bm.num_free_blocks == 6 and bm.ref_counts == [0] * 6


def test_abort_frees_blocks_at_once():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, eos_token_ids=[])
    a, b = seq(range(9)), seq(range(50, 59))
    sched.add(a)
    sched.add(b)
    sched.postprocess(sched.schedule(), [7, 7])
    assert bm.num_free_blocks == 2
    sched.finish(a, "abort")
    assert a.finish_reason == "abort" and a.status == Status.FINISHED
    assert bm.num_free_blocks == 5 and sched.running == [b]


def test_token_stops_eos_stop_ids_and_ignore_eos():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, eos_token_ids=[7])
    a = seq(range(3))
    b = Sequence("b", prompt(range(3)), SamplingParams(max_tokens=3, ignore_eos=True))
    c = Sequence("c", prompt(range(3)), SamplingParams(max_tokens=3, stop_token_ids=[5]))
    for s in (a, b, c):
        sched.add(s)
    sched.postprocess(sched.schedule(), [7, 7, 5])
    assert (a.finish_reason, a.stop_reason) == ("stop", None)
    assert not b.is_finished
    assert (c.finish_reason, c.stop_reason) == ("stop", 5)


def test_second_completion_waits_for_the_first_to_fill_the_prefix_cache():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32, eos_token_ids=[])
    first, second = seq(range(10), request_id="r", index=0), seq(range(10), request_id="r", index=1)
    sched.add(first)
    sched.add(second)
    assert sched.schedule() == [first]
    sched.postprocess([first], [7])
    assert sched.schedule() == [first, second]
    assert second.num_cached_tokens == 8 and second.num_scheduled_tokens == 2
