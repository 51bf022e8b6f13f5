"""M-RoPE position ids: three rows (time, height, width) for every token.

The rule (the original releases, as in transformers 4.x and vLLM):
- a text token takes (p, p, p) with p the next free position, then p += 1;
- a vision block whose LLM grid is (T, H, W) = (grid_t, grid_h / merge, grid_w / merge) lists its
  tokens t-major, then h, then w, and token (t, h, w) takes (p + time(t), p + h, p + w);
  after the block p = max(every position of the block) + 1 = p + max(time(T - 1) + 1, H, W).
- time(t) is t for Qwen2-VL and for images. Qwen2.5-VL counts absolute time for videos:
  time(t) = int(t * second_per_grid_t * tokens_per_second), with second_per_grid_t = temporal_patch_size
  / sampled fps from the processor (1.0 when not given) and tokens_per_second from the vision config.

Worked example, `[T T V V V V V V T T]` with one image whose LLM grid is (1, 2, 3)
(6 tokens, rows t / h / w):

    token:  T  T  V  V  V  V  V  V  T  T
    t:      0  1  2  2  2  2  2  2  5  6
    h:      0  1  2  2  2  3  3  3  5  6
    w:      0  1  2  3  4  2  3  4  5  6

After the image p = 2 + max(1, 2, 3) = 5. `rope_delta = max(position) + 1 - len = 7 - 10 = -3`:
a token generated later at cache index c takes position c + rope_delta on all three rows.

Qwen2.5-VL, `[T V V V V T]` with a video of LLM grid (2, 1, 2) sampled at 2 fps (second_per_grid_t
= 2 / 2 = 1.0) and tokens_per_second 2: time(t) = 0, 2, so the rows are t: 0 1 1 3 3 4,
h: 0 1 1 1 1 4, w: 0 1 2 1 2 4 (text resumes at 1 + max(2 + 1, 1, 2) = 4).

transformers 5 advances p by max(H, W) only, ignoring T and time; that differs for videos whose last
time(t) + 1 exceeds the merged rows/columns (in Qwen2.5-VL, most videos: time runs two positions a
grid step). We follow the original rule, which the models were trained with (docs/parity.md).
"""

from __future__ import annotations

import torch


def mrope_positions(input_ids, image_grid_thw, video_grid_thw, config,
                    second_per_grid_ts=None) -> tuple[torch.Tensor, int]:
    """Positions [3, L] (long) and the decode offset rope_delta for one unpadded sequence.

    `config` is the model's Qwen2VLConfig (pad token ids, the vision merge size and, for Qwen2.5-VL,
    tokens_per_second come from it); `second_per_grid_ts` has one value per video (Qwen2.5-VL only).

    Images and videos are consumed in the order their pad runs appear; each run of pads must hold
    exactly t*h*w/merge^2 tokens of the next grid of its kind.
    """
    image_token_id, video_token_id = config.image_token_id, config.video_token_id
    spatial_merge_size = config.vision.spatial_merge_size
    ids = torch.as_tensor(input_ids).tolist()
    grids = {
        image_token_id: [] if image_grid_thw is None else torch.as_tensor(image_grid_thw).tolist(),
        video_token_id: [] if video_grid_thw is None else torch.as_tensor(video_grid_thw).tolist(),
    }
    video_time = _video_time_steps(video_grid_thw, second_per_grid_ts, config.vision.tokens_per_second)
    used = {image_token_id: 0, video_token_id: 0}
    rows: list[torch.Tensor] = []
    p = 0  # next free position
    i, n = 0, len(ids)
    while i < n:
        tok = ids[i]
        if tok not in grids:
            j = i
            while j < n and ids[j] not in grids:
                j += 1
            rows.append(torch.arange(p, p + j - i).expand(3, -1))
            p += j - i
            i = j
            continue
        k = used[tok]
        if k >= len(grids[tok]):
            kind = "image" if tok == image_token_id else "video"
            raise ValueError(f"more {kind} placeholder runs than {kind} grids ({len(grids[tok])})")
        t, h, w = grids[tok][k]
        used[tok] += 1
        h, w = h // spatial_merge_size, w // spatial_merge_size
        count = t * h * w
        if ids[i : i + count] != [tok] * count:
            raise ValueError(f"vision block at token {i} should hold {count} pad tokens for grid {(t, h, w)}")
        time = video_time[k] if tok == video_token_id else torch.arange(t)
        tt, hh, ww = torch.meshgrid(time, torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p)
        p += max(int(time[-1]) + 1, h, w)
        i += count
    for tok, k in used.items():
        if k != len(grids[tok]):
            kind = "image" if tok == image_token_id else "video"
            raise ValueError(f"{len(grids[tok])} {kind} grids given but {k} placeholder runs found")
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    rope_delta = (int(positions.max()) + 1 - n) if n else 0
    return positions.long(), rope_delta


def _video_time_steps(video_grid_thw, second_per_grid_ts, tokens_per_second) -> list[torch.Tensor]:
    """The temporal index of each grid step of each video: arange(t), or for Qwen2.5-VL
    int(arange(t) * second_per_grid_t * tokens_per_second) in float32, as the reference rounds it."""
    grids = [] if video_grid_thw is None else torch.as_tensor(video_grid_thw).tolist()
    if tokens_per_second is None:
        return [torch.arange(t) for t, _, _ in grids]
    if second_per_grid_ts is None:
        seconds = torch.ones(len(grids))
    else:
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten()
        if len(seconds) != len(grids):
            raise ValueError(f"{len(seconds)} second_per_grid_ts values for {len(grids)} videos")
        if not bool(torch.isfinite(seconds).all()) or bool((seconds < 0).any()):
            raise ValueError(f"second_per_grid_ts must be finite and >= 0, got {seconds.tolist()}")
    return [(torch.arange(t) * s * tokens_per_second).long() for (t, _, _), s in zip(grids, seconds)]


def decode_positions(cache_index: int, rope_delta: int) -> torch.Tensor:
    """Positions [3, 1] for the token at `cache_index` generated after the prompt."""
    return torch.full((3, 1), cache_index + rope_delta, dtype=torch.long)
