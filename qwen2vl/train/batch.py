"""Micro-batches: which rows go together (a seeded shuffle per epoch), and packing them along the token
axis, as the model takes tokens: [N, D] for all sequences, no padding, sequence boundaries in cu_seqlens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2vl.train.examples import IGNORE, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N]: the sequences one after another
    positions: torch.Tensor  # [3, N]
    targets: torch.Tensor  # [N]: the next token of the same sequence where it is trained, else IGNORE
    cu_seqlens: list[int]  # sequence i is [cu_seqlens[i], cu_seqlens[i + 1])
    pixel_values: torch.Tensor | None  # every image of every sequence, in packing order
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def pack(examples: list[Example]) -> Batch:
    """One Batch of `examples`, in order. The loss at position t predicts token t + 1 of the same
    sequence (labels shifted per sequence, so no sequence predicts the next one's first token)."""
    assert examples
    lengths = [len(e) for e in examples]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    targets = [torch.cat([e.labels[1:], e.labels.new_full((1,), IGNORE)]) for e in examples]
    return Batch(
        input_ids=torch.cat([e.input_ids for e in examples]),
        positions=torch.cat([e.positions for e in examples], dim=1),
        targets=torch.cat(targets),
        cu_seqlens=cu,
        pixel_values=_cat([e.pixel_values for e in examples]),
        image_grid_thw=_cat([e.image_grid_thw for e in examples]),
        pixel_values_videos=_cat([e.pixel_values_videos for e in examples]),
        video_grid_thw=_cat([e.video_grid_thw for e in examples]),
    )


def _cat(tensors: list) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present) if present else None


def epoch_order(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of `epoch`: a shuffle that depends only on (seed, epoch), so a
    resumed run meets the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]
