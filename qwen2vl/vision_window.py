"""What Qwen2.5-VL's vision tower does differently from Qwen2-VL's: a gated SiLU MLP, and window
attention over patches regrouped window by window.

The rest of the tower (patch embedding, 2-D rotary, attention, the 2x2 merger) is vision.py's; its
norms are RMSNorms instead of LayerNorms (picked there by `cfg.family`).

Window attention. The merged-token grid of each frame (h/2 x w/2 tokens of 2x2 patches) is cut into
windows of `window_tokens` x `window_tokens` tokens (window_size 112 px = 4 x 4 tokens = 8 x 8
patches), the last row and column of windows cut short where the grid doesn't divide. The tower
lists its patches window by window (the 4 patches of a merged token stay together, so the merger
still reads them as 4 consecutive rows); every block attends within its window, except the blocks in
`fullatt_block_indexes`, which attend over the whole frame (a frame's patches stay contiguous). The
merger's output goes back to the processor's order at the end.

Worked example: a frame of 3 x 5 merged tokens (grid 1 x 6 x 10), windows of 2 x 2 tokens. Token
ids in raster order and the windows they fall in:

    0  1 | 2  3 | 4          window order: [0 1 5 6] [2 3 7 8] [4 9] [10 11] [12 13] [14]
    5  6 | 7  8 | 9          window sizes in patches: 16, 16, 8, 8, 8, 4
    -----+------+---
   10 11 |12 13 |14
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.reference import TORCH_OPS
from qwen2vl.config import VisionConfig


class GatedMlp(nn.Module):
    """down(silu(gate(x)) * up(x)), all three with biases (the decoder's MLP has none)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.up_proj = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x, ops=TORCH_OPS):
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def window_order(grid_thw: torch.Tensor, merge: int, window_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """(index, cu_windows): `index` [P / merge^2] lists the merged tokens of all grids (numbered in
    the processor's order) window by window; `cu_windows` are the window boundaries in patches
    (cumulative, starting at 0), the spans the windowed blocks attend within."""
    k, index, sizes, offset = window_tokens, [], [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // merge, w // merge
        nh, nw = -(-h // k), -(-w // k)  # windows down and across, the last ones cut short
        ids = F.pad(torch.arange(t * h * w).view(t, h, w), (0, nw * k - w, 0, nh * k - h), value=-1)
        ids = ids.view(t, nh, k, nw, k).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, k * k)  # [windows, k*k]
        index.append(ids[ids >= 0] + offset)
        sizes.append((ids >= 0).sum(1))
        offset += t * h * w
    cu = torch.cat(sizes).cumsum(0) * merge * merge
    return torch.cat(index), [0] + cu.tolist()


def to_patch_order(index: torch.Tensor, merge: int) -> torch.Tensor:
    """Merged-token order [P / merge^2] -> the order of the patches [P] (a token's patches together)."""
    unit = merge * merge
    return (index[:, None] * unit + torch.arange(unit)).flatten()
