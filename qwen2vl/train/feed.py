"""The rows' way to the steps: checked before the first step, encoded and packed into each step's
micro-batches, here or in worker processes ahead of the training (`qwen2vl train --workers N`)."""

from __future__ import annotations

import math

import torch

from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import epoch_order, pack
from qwen2vl.train.data import DataError
from qwen2vl.train.examples import answer_mask, encode_row


class RowCheck(torch.utils.data.Dataset):
    """Item i: the answers of chunk i of the rows located in their tokens, or the first row's problem."""

    CHUNK = 256

    def __init__(self, rows: list, processor: Processor):
        self.rows, self.processor = rows, processor

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.CHUNK)

    def __getitem__(self, i: int) -> str | None:
        for row in self.rows[i * self.CHUNK:(i + 1) * self.CHUNK]:
            try:
                answer_mask(row.messages, self.processor.encode_text(row.messages, answers_hold_special_tokens=True),
                            self.processor, row.where)
            except DataError as e:
                return str(e)
        return None


def check_rows(rows: list, processor: Processor, workers: int) -> None:
    """Every row's answers found in its template's tokens before the first step (DataError if not):
    ~5 ms a row on one core, minutes for a GPU run's 50,000 rows, so spread over the workers."""
    for problem in in_order(RowCheck(rows, processor), workers):
        if problem:
            raise DataError(problem)


class Encoder:
    """Rows -> packed batches (pictures processed, tokens and positions laid out); rows over
    `max_length` tokens are skipped, each said once per process."""

    def __init__(self, processor: Processor, config, max_length: int, log):
        self.processor, self.config, self.max_length, self.log = processor, config, max_length, log
        self.skipped: set[str] = set()

    def batches(self, indices: list[list[int]], source) -> list:
        out = []
        for idx in indices:
            examples = []
            for i in idx:
                e = encode_row(source[i], self.processor, self.config)
                if len(e) > self.max_length:
                    if e.where not in self.skipped:
                        self.skipped.add(e.where)
                        self.log(f"skipping {e.where}: {len(e)} tokens, over --max-length {self.max_length}")
                    continue
                examples.append(e)
            if examples:
                out.append(pack(examples))
        return out


class StepBatches(torch.utils.data.Dataset):
    """Item i: the micro-batches of step start + i. Which rows a step takes depends on (seed, step)
    alone, so workers can make steps ahead, in any process, and a resumed run takes the same rows."""

    def __init__(self, rows: list, encoder: Encoder, batch_size: int, grad_accum: int, seed: int, start: int,
                 total: int):
        self.rows, self.encoder, self.batch_size, self.grad_accum = rows, encoder, batch_size, grad_accum
        self.seed, self.start, self.total = seed, start, total
        self.per_epoch = math.ceil(len(rows) / batch_size)
        self.orders: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return self.total - self.start

    def micro_batch(self, m: int) -> list[int]:
        epoch = m // self.per_epoch
        if epoch not in self.orders:
            self.orders[epoch] = epoch_order(len(self.rows), self.batch_size, self.seed, epoch)
        return self.orders[epoch][m % self.per_epoch]

    def __getitem__(self, i: int) -> list:
        step = self.start + i
        return self.encoder.batches([self.micro_batch(step * self.grad_accum + m) for m in range(self.grad_accum)],
                                    self.rows)


def in_order(items: torch.utils.data.Dataset, workers: int, seed: int = 0):
    """items[0], items[1], ... made here as they are taken, or by `workers` processes ahead of them (a
    picture's processing is ~10 ms on one core; a GPU's step on the demo model is shorter). The loader
    draws its workers' seeds from a generator of its own, not from the global one that LoRA weights and
    dropout masks come from, so a run with workers trains exactly as one without."""
    if workers == 0:
        return (items[i] for i in range(len(items)))
    return torch.utils.data.DataLoader(items, batch_size=None, num_workers=workers, collate_fn=_as_made,
                                       prefetch_factor=4, generator=torch.Generator().manual_seed(seed))


def _as_made(item):
    return item
