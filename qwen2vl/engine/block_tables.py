"""The running sequences' block tables kept between steps, one row each, in one host tensor.

Every step the runner needs the batch's block tables as a [B, W] tensor. Flattening them from each
sequence's Python list costs B x W list work per step (128 sequences of 2k tokens: 16k ints); here
a sequence keeps its row while it runs, and a step writes only what changed since the last one: a
decode's new block every block_size tokens, or the whole list when the block manager replaced it
(`allocate` and `free_seq` assign a new list, `append` grows it in place, so the list's identity
says which). All of a step's writes are one indexed copy. Rows of sequences that stopped running
(finished or preempted) go to the next newcomers.
"""

from __future__ import annotations

import torch

from qwen2vl.engine.sequence import Sequence, Status


class BlockTables:
    def __init__(self):
        self.table = torch.zeros(8, 16, dtype=torch.long)  # [rows, width] block ids; past a row's length: stale
        self.owner: list[Sequence | None] = []  # per row, None when free
        self.mirrored: list[list[int] | None] = []  # per row: the block_table list it copies
        self.lengths: list[int] = []  # per row: how many of that list's blocks are written
        self.row_of: dict[int, int] = {}  # seq_id -> row

    def rows(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's row, with the blocks it gained since the last call written."""
        self._release_stopped()
        rows = [self.row_of.get(s.seq_id) for s in seqs]
        rows = [self._take(s) if r is None else r for s, r in zip(seqs, rows)]
        writes = []  # (row, first column, blocks)
        for seq, row in zip(seqs, rows):
            table = seq.block_table
            kept = self.mirrored[row] is table and len(table) >= self.lengths[row]
            start = self.lengths[row] if kept else 0
            if len(table) > start:
                writes.append((row, start, table[start:]))
            self.mirrored[row], self.lengths[row] = table, len(table)
        self._fit(len(self.owner), max((start + len(b) for _, start, b in writes), default=0))
        if writes:
            width = self.table.shape[1]
            at = [row * width + start + j for row, start, b in writes for j in range(len(b))]
            new = [x for _, _, b in writes for x in b]
            self.table.view(-1).index_copy_(0, torch.tensor(at), torch.tensor(new, dtype=torch.long))
        return rows

    def _take(self, seq: Sequence) -> int:
        row = next((r for r, s in enumerate(self.owner) if s is None), len(self.owner))
        if row == len(self.owner):
            self.owner.append(None)
            self.mirrored.append(None)
            self.lengths.append(0)
        self.owner[row], self.mirrored[row], self.lengths[row] = seq, None, 0
        self.row_of[seq.seq_id] = row
        return row

    def _release_stopped(self) -> None:
        for row, seq in enumerate(self.owner):
            if seq is not None and seq.status != Status.RUNNING:
                del self.row_of[seq.seq_id]
                self.owner[row], self.mirrored[row] = None, None

    def _fit(self, rows: int, width: int) -> None:
        """Grow the table (doubling) to at least rows x width, keeping what is written."""
        have_rows, have_width = self.table.shape
        if rows <= have_rows and width <= have_width:
            return
        new_rows, new_width = max(rows, have_rows), have_width
        if rows > have_rows:
            new_rows = max(rows, 2 * have_rows)
        while new_width < width:
            new_width *= 2
        table = torch.zeros(new_rows, new_width, dtype=torch.long)
        table[:have_rows, :have_width] = self.table
        self.table = table
