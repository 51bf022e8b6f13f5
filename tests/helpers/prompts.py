"""Prompts built by hand for model tests: text tokens and vision blocks with the right number of pad
tokens and random pixels, and transformers' logits for them."""

from __future__ import annotations

import torch

from qwen2vl.config import Qwen2VLConfig


class Seq:
    """Builds a prompt: text tokens and vision blocks with the right number of pad tokens."""

    def __init__(self, config: Qwen2VLConfig, seed=0):
        self.c = config
        self.g = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.types: list[int] = []  # transformers' mm_token_type_ids: 0 text, 1 image, 2 video
        self.images, self.videos, self.image_grids, self.video_grids = [], [], [], []
        self.seconds: list[float] = []

    def text(self, n):
        self.ids += torch.randint(0, 200, (n,), generator=self.g).tolist()
        self.types += [0] * n
        return self

    def vision(self, grid, video=False, seconds=None):
        """A vision block; `seconds`: the video's second_per_grid_t (Qwen2.5-VL)."""
        t, h, w = grid
        pad, kind = (self.c.video_token_id, 2) if video else (self.c.image_token_id, 1)
        n = t * h * w // 4
        self.ids += [self.c.vision_start_token_id] + [pad] * n + [self.c.vision_end_token_id]
        self.types += [0] + [kind] * n + [0]
        (self.videos if video else self.images).append(torch.randn(t * h * w, 1176, generator=self.g))
        (self.video_grids if video else self.image_grids).append(list(grid))
        if seconds is not None:
            self.seconds.append(seconds)
        return self

    def inputs(self):
        cat = lambda xs: torch.cat(xs) if xs else None
        grid = lambda gs: torch.tensor(gs) if gs else None
        return dict(
            input_ids=torch.tensor(self.ids),
            pixel_values=cat(self.images),
            image_grid_thw=grid(self.image_grids),
            pixel_values_videos=cat(self.videos),
            video_grid_thw=grid(self.video_grids),
            **({"second_per_grid_ts": torch.tensor(self.seconds)} if self.seconds else {}),
        )


def reference_logits(hf, inputs, types, **extra):
    """transformers' logits [L, vocab] of one sequence (`extra`: second_per_grid_ts, position_ids)."""
    with torch.no_grad():
        out = hf(
            input_ids=inputs["input_ids"][None],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            pixel_values_videos=inputs["pixel_values_videos"],
            video_grid_thw=inputs["video_grid_thw"],
            mm_token_type_ids=torch.tensor([types]),
            **extra,
        )
    return out.logits[0]
