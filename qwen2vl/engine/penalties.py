"""Repetition, presence and frequency penalties from per-sequence token tables kept on the device.

Every sequence that has a penalty owns one row of two tables: `tokens[row, :n]`, the distinct
tokens it has seen (prompt and output when it has a repetition penalty, output only otherwise),
and `counts[row, :n]`, how often each came out of the model (0 for a token only the prompt has).
A step's new tokens are appended or counted with one indexed write; applying reads the logits at
the seen tokens with one gather and writes them back with one scatter. So a step costs what the
batch's distinct tokens number, never the vocabulary, and nothing is recounted from the history.

Rules (what HF and OpenAI do): repetition divides a positive logit by the penalty and multiplies a
negative one, over prompt + output; presence subtracts a constant from every output token,
frequency subtracts per occurrence.
"""

from __future__ import annotations

from collections import Counter

import torch

from qwen2vl.engine.sequence import Sequence


def penalised(params) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


class Penalties:
    def __init__(self, device: torch.device):
        self.device = device
        self.tokens = torch.zeros(0, 64, dtype=torch.long, device=device)  # [rows, width]
        self.counts = torch.zeros(0, 64, device=device)
        self.columns: list[dict[int, int]] = []  # per row: token -> its column
        self.owner: list[Sequence | None] = []  # per row, None when free
        self.row_of: dict[int, int] = {}  # seq_id -> row

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Penalise logits [B, V] in place, row i under seqs[i]'s params."""
        batch = [i for i, s in enumerate(seqs) if penalised(s.params)]
        if not batch:
            return
        self._release_finished()
        rows = [self._row(seqs[i]) for i in batch]
        lengths = [len(self.columns[r]) for r in rows]
        width = max(max(lengths), 1)
        p = [(s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty, n)
             for s, n in zip((seqs[i] for i in batch), lengths)]
        host = torch.tensor([[b, r] for b, r in zip(batch, rows)], dtype=torch.long)
        batch_t, rows_t = host.to(self.device, non_blocking=True).unbind(1)
        rep, presence, frequency, n = torch.tensor(p, dtype=torch.float32).to(self.device, non_blocking=True).unbind(1)
        tok = self.tokens[:, :width].index_select(0, rows_t)  # [R, width]
        cnt = self.counts[:, :width].index_select(0, rows_t)
        # columns past a row's length repeat its first entry: the scatter then writes equal values twice
        past = torch.arange(width, device=self.device) >= n[:, None]
        tok, cnt = torch.where(past, tok[:, :1], tok), torch.where(past, cnt[:, :1], cnt)
        flat, at = logits.view(-1), (batch_t[:, None] * logits.shape[1] + tok).flatten()  # [R * width]
        v = flat.index_select(0, at).view_as(cnt)
        rep = rep[:, None]
        v = torch.where(v > 0, v / rep, v * rep) - (frequency[:, None] * cnt + presence[:, None] * (cnt > 0))
        flat.index_copy_(0, at, v.flatten())

    @torch.inference_mode()
    def update(self, seqs: list[Sequence], tokens: list[int | None]) -> None:
        """Count the tokens just sampled for seqs (None: nothing sampled for that row)."""
        rows, cols, new = [], [], []
        for seq, t in zip(seqs, tokens):
            row = self.row_of.get(seq.seq_id)
            if row is None or t is None:
                continue
            columns = self.columns[row]
            col = columns.get(t)
            if col is None:
                col = columns[t] = len(columns)
            rows.append(row)
            cols.append(col)
            new.append(t)
        if not rows:
            return
        self._fit(len(self.owner), max(cols) + 1)
        width = self.tokens.shape[1]
        at, new = torch.tensor([[r * width + c for r, c in zip(rows, cols)], new]).to(self.device, non_blocking=True)
        self.tokens.view(-1).index_copy_(0, at, new)
        self.counts.view(-1).index_add_(0, at, torch.ones(len(rows), device=self.device))

    def _row(self, seq: Sequence) -> int:
        """The sequence's row, filled from its tokens so far on first use."""
        row = self.row_of.get(seq.seq_id)
        if row is not None:
            return row
        row = next((r for r, s in enumerate(self.owner) if s is None), len(self.owner))
        if row == len(self.owner):
            self.owner.append(None)
            self.columns.append({})
        seen = seq.token_ids if seq.params.repetition_penalty != 1.0 else seq.completion_token_ids
        columns = dict.fromkeys(seen)  # distinct, in order of first appearance
        out = Counter(seq.completion_token_ids)
        for col, t in enumerate(columns):
            columns[t] = col
        self._fit(len(self.owner), len(columns))
        self.tokens[row].zero_()
        self.counts[row].zero_()
        if columns:
            n = len(columns)
            self.tokens[row, :n] = torch.tensor(list(columns), dtype=torch.long)
            self.counts[row, :n] = torch.tensor([float(out[t]) for t in columns])
        self.columns[row], self.owner[row], self.row_of[seq.seq_id] = columns, seq, row
        return row

    def _release_finished(self) -> None:
        for row, seq in enumerate(self.owner):
            if seq is not None and seq.is_finished:
                del self.row_of[seq.seq_id]
                self.owner[row] = None
                self.columns[row] = {}

    def _fit(self, rows: int, width: int) -> None:
        """Grow the tables (doubling) to at least rows x width."""
        have_rows, have_width = self.tokens.shape
        if rows <= have_rows and width <= have_width:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows, 8)
        new_width = have_width
        while new_width < width:
            new_width *= 2
        tokens = torch.zeros(new_rows, new_width, dtype=torch.long, device=self.device)
        counts = torch.zeros(new_rows, new_width, device=self.device)
        tokens[:have_rows, :have_width] = self.tokens
        counts[:have_rows, :have_width] = self.counts
        self.tokens, self.counts = tokens, counts
