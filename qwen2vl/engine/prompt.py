"""A prompt as the engine sees it: token ids, its images/videos, and its M-RoPE positions.

Built once per request from the processor's output. Each image or video becomes a `VisionItem`
that knows where its pad run sits in the ids and carries a content hash: the hash keys the vision
cache (encode once) and the prefix cache (pad ids are the same for every picture, so blocks that
hold pads must also be keyed on what the pads stand for).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qwen2vl.positions import mrope_positions


@dataclass
class VisionItem:
    kind: str  # "image" or "video": one path, a video is a grid with t > 1
    pixel_values: torch.Tensor  # [t*h*w, patch_dim] in the processor's patch order
    grid_thw: tuple[int, int, int]
    content_hash: int
    offset: int  # index of the first pad token in the prompt
    num_tokens: int  # t*h*w / merge^2 pad tokens

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass
class Prompt:
    token_ids: list[int]
    vision: list[VisionItem]  # in prompt order
    positions: torch.Tensor  # [3, L] long
    rope_delta: int  # decode position of cache index c is c + rope_delta

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_inputs(cls, inputs: dict, config) -> Prompt:
        """From the processor's dict: input_ids and, when present, pixel_values / image_grid_thw /
        pixel_values_videos / video_grid_thw / second_per_grid_ts (batch of one)."""
        ids = torch.as_tensor(inputs["input_ids"])
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"input_ids: one prompt per request, got a batch of {ids.shape[0]}")
            ids = ids[0]
        if ids.numel() == 0:
            raise ValueError("input_ids: the prompt is empty")
        token_ids = ids.tolist()
        image_grid, video_grid = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
        positions, rope_delta = mrope_positions(token_ids, image_grid, video_grid, config,
                                                inputs.get("second_per_grid_ts"))
        merge = config.vision.spatial_merge_size
        queues = {
            config.image_token_id: _split("image", inputs.get("pixel_values"), image_grid, merge),
            config.video_token_id: _split("video", inputs.get("pixel_values_videos"), video_grid, merge),
        }
        vision, i = [], 0
        while i < len(token_ids):  # pad runs, in order; mrope_positions already checked their lengths
            queue = queues.get(token_ids[i])
            if queue is None:
                i += 1
                continue
            kind, pixels, grid, n = queue.pop(0)
            vision.append(VisionItem(kind, pixels, grid, content_hash(kind, pixels, grid), i, n))
            i += n
        return cls(token_ids, vision, positions, rope_delta)

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of cache indices start..end-1 (prompt, then generated)."""
        p = len(self.token_ids)
        parts = []
        if start < p:
            parts.append(self.positions[:, start : min(end, p)])
        if end > p:
            parts.append(torch.arange(max(start, p), end).add_(self.rope_delta).expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _split(kind: str, pixel_values, grid_thw, merge: int) -> list:
    """Cut the processor's concatenated pixel rows into one entry per grid."""
    if grid_thw is None:
        return []
    grids = [tuple(int(x) for x in g) for g in torch.as_tensor(grid_thw).tolist()]
    rows = [t * h * w for t, h, w in grids]
    if pixel_values is None or pixel_values.shape[0] != sum(rows):
        got = None if pixel_values is None else pixel_values.shape[0]
        raise ValueError(f"{kind}: grids {grids} need {sum(rows)} pixel rows, got {got}")
    chunks = torch.split(pixel_values, rows)
    return [(kind, px, g, n // merge**2) for px, g, n in zip(chunks, grids, rows)]


def content_hash(kind: str, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> int:
    """128-bit hash of what the pads stand for: the pixels and the grid (the same picture resized
    to another grid is different input to the encoder)."""
    # sha256 over the tensor's own memory: no copy, and OpenSSL's SHA extensions hash ~1.5x faster
    # than blake2b (a 448x448 image's 4.8 MB of float pixels: 2.3 vs 3.4 ms, plus 0.5 ms of copy)
    h = hashlib.sha256(f"{kind}:{grid_thw}:{pixel_values.dtype}".encode())
    h.update(memoryview(pixel_values.detach().contiguous().cpu().view(torch.uint8).numpy()))
    return int.from_bytes(h.digest()[:16], "little")
