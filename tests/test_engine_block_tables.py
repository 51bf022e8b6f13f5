"""Block tables kept between steps (engine/block_tables.py) and the runner's packing from them,
against a per-token recomputation from the sequences' own lists."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import torch

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.block_tables import BlockTables
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.runner import ModelRunner
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence, Status

BS = 4


def shuffled(num_blocks: int) -> BlockManager:
    """A block manager that hands blocks out in a random order, as a busy one does."""
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=False)
    bm.free = OrderedDict.fromkeys(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist())
    return bm


def running(bm: BlockManager, ids, delta=0, positions=None) -> Sequence:
    positions = torch.arange(len(ids)).expand(3, -1) * torch.tensor([[1], [2], [3]]) if positions is None else positions
    s = Sequence("r", Prompt(list(ids), [], positions, delta), SamplingParams())
    assert bm.allocate(s)
    s.status = Status.RUNNING
    return s


def rows_equal_lists(tables: BlockTables, seqs: list[Sequence], rows: list[int]) -> bool:
    return all(tables.table[r, : len(s.block_table)].tolist() == s.block_table for s, r in zip(seqs, rows))


def test_rows_are_kept_written_once_and_handed_on():
    bm = shuffled(64)
    a, b = running(bm, range(5)), running(bm, range(100, 107))
    tables = BlockTables()
    rows = tables.rows([a, b])
    assert rows_equal_lists(tables, [a, b], rows)

    tables.table[rows[0], 0] = -7  # a mark: a block written once is never written again
    for t in range(4):  # a crosses a block boundary
        a.append_token(t)
        bm.append(a)
    assert tables.rows([a, b]) == rows
    assert tables.table[rows[0], 0] == -7 and tables.table[rows[0], 1:3].tolist() == a.block_table[1:]

    bm.free_seq(a)  # preempted, then admitted again with other blocks: the row is rewritten
    a.status = Status.WAITING
    other = running(bm, range(50, 62))
    assert bm.allocate(a)
    a.status = Status.RUNNING
    rows = tables.rows([a, b, other])
    assert rows_equal_lists(tables, [a, b, other], rows) and tables.table[rows[0], 0] != -7

    b.status = Status.FINISHED  # its row goes to the next newcomer
    c = running(bm, range(200, 290))  # 23 blocks: the table grows past its first width
    new_rows = tables.rows([a, c, other])
    assert new_rows == [rows[0], rows[1], rows[2]]
    assert tables.table.shape[1] >= 23 and rows_equal_lists(tables, [a, c, other], new_rows)


def naive_pack(seqs: list[Sequence]):
    """Per token, from each sequence's lists: ids, positions [3, N], slots, context slots."""
    ids, pos, slots, ctx_slots = [], [], [], []
    max_ctx = max(s.num_cached_tokens + s.num_scheduled_tokens for s in seqs)
    slot = lambda s, i: s.block_table[i // BS] * BS + i % BS  # noqa: E731
    for s in seqs:
        start, end = s.num_cached_tokens, s.num_cached_tokens + s.num_scheduled_tokens
        for i in range(start, end):
            ids.append(s.token_ids[i])
            pos.append(s.prompt.positions[:, i].tolist() if i < s.num_prompt_tokens else [i + s.prompt.rope_delta] * 3)
            slots.append(slot(s, i))
        ctx_slots.append([slot(s, min(c, end - 1) if c < end else 0) for c in range(max_ctx)])
    return ids, torch.tensor(pos).T.tolist(), slots, ctx_slots


def test_prepare_matches_a_per_token_packing():
    """Decodes, a prompt chunk that stops short, a chunk that runs from the prompt into generated
    tokens (a recompute after preemption), with rope deltas; then a decode-only step, which packs
    without the per-token index."""
    bm = shuffled(64)
    runner = SimpleNamespace(cache=SimpleNamespace(block_size=BS), device=torch.device("cpu"), tables=BlockTables())
    decode = running(bm, range(10, 19), delta=-3)
    decode.num_cached_tokens = 9
    decode.append_token(5)
    bm.append(decode)
    chunk = running(bm, range(30, 44), positions=torch.randint(0, 50, (3, 14)))
    chunk.num_cached_tokens = 4
    resumed = running(bm, range(60, 66), delta=2)
    for t in (7, 8, 9):
        resumed.append_token(t)
    bm.append(resumed)
    for s, n in ((decode, 1), (chunk, 6), (resumed, 9)):
        s.num_scheduled_tokens = n
    for seqs in ([decode, chunk, resumed], [decode, resumed]):
        ids, positions, batch = ModelRunner.prepare(runner, seqs)
        want_ids, want_pos, want_slots, want_ctx = naive_pack(seqs)
        assert ids.tolist() == want_ids and positions.tolist() == want_pos
        assert batch.slot_mapping.tolist() == want_slots and batch.ctx_slots.tolist() == want_ctx
        ends = [s.num_cached_tokens + s.num_scheduled_tokens for s in seqs]
        assert batch.ctx_lens_t.tolist() == batch.ctx_lens == ends
        for s in seqs:  # the step ran: what a decode looks like next
            s.num_cached_tokens += s.num_scheduled_tokens
            s.num_scheduled_tokens = 1
            s.append_token(3)
            bm.append(s)
