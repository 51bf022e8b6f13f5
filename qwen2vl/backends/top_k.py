"""Row top-k of float32 logits without a torch.topk over the vocabulary, in torch: the reference the
CPU kernel (cpu/csrc/top_k.c) is tested against, and what every other device runs.

On the CPU a top-k or an argmax over the 151,936-token vocabulary costs several times a plain
reduction. So a row is cut into blocks of BLOCK columns and the search narrows: the k best tokens
lie in the k blocks with the largest maxima (any other block's best is beaten by k block maxima).
"""

from __future__ import annotations

import torch

BLOCK = 128


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) of x [R, V] (values sorted, their columns): the k best lie in the k blocks with the
    best maxima."""
    b = blocks(x, float("-inf"))
    r, nb, _ = b.shape
    if k * 4 > nb:  # the blocks would cover a good part of the row: no gain
        return x.topk(k, dim=-1)
    best = b.amax(-1).topk(k, dim=-1).indices  # [R, k]
    cand = block_rows(b, best).view(r, k * BLOCK)
    values, j = cand.topk(k, dim=-1)
    columns = best.gather(1, j // BLOCK) * BLOCK + j % BLOCK
    return values, columns


def blocks(x: torch.Tensor, fill: float) -> torch.Tensor:
    """[R, V] -> [R, nb, BLOCK], padded with `fill` when V is not a multiple (small test vocabularies)."""
    pad = -x.shape[1] % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(x.shape[0], -1, BLOCK)


def block_rows(b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """blocks b [R, nb, BLOCK], block ids i [R] or [R, k] -> their columns [R, BLOCK] or [R, k, BLOCK].

    index_select over flattened rows: on the CPU, advanced indexing (b[rows, i]) is many times slower."""
    r, nb, width = b.shape
    rows = torch.arange(r, device=i.device).view(-1, *[1] * (i.dim() - 1))
    return b.reshape(r * nb, width).index_select(0, (rows * nb + i).flatten()).view(*i.shape, width)
