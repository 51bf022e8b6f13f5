"""M-RoPE position ids: three rows (time, height, width) for every token.

The rule (original Qwen2-VL, as in transformers 4.x and vLLM):
- a text token takes (p, p, p) with p the next free position, then p += 1;
- a vision block whose LLM grid is (T, H, W) = (grid_t, grid_h / merge, grid_w / merge) lists its
  tokens t-major, then h, then w, and token (t, h, w) takes (p + t, p + h, p + w);
  after the block p = p + max(T, H, W).

Worked example, `[T T V V V V V V T T]` with one image whose LLM grid is (1, 2, 3)
(6 tokens, rows t / h / w):

    token:  T  T  V  V  V  V  V  V  T  T
    t:      0  1  2  2  2  2  2  2  5  6
    h:      0  1  2  2  2  3  3  3  5  6
    w:      0  1  2  3  4  2  3  4  5  6

After the image p = 2 + max(1, 2, 3) = 5. `rope_delta = max(position) + 1 - len = 7 - 10 = -3`:
a token generated later at cache index c takes position c + rope_delta on all three rows.

transformers 5 advances p by max(H, W) only, ignoring T; that differs for videos with more
temporal steps than merged rows/columns. We follow the original rule, which the model was trained with.
"""

from __future__ import annotations

import torch


def mrope_positions(input_ids, image_grid_thw, video_grid_thw, config) -> tuple[torch.Tensor, int]:
    """Positions [3, L] (long) and the decode offset rope_delta for one unpadded sequence.

    `config` is the model's Qwen2VLConfig (pad token ids and the vision merge size come from it).

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
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + p)
        p += max(t, h, w)
        i += count
    for tok, k in used.items():
        if k != len(grids[tok]):
            kind = "image" if tok == image_token_id else "video"
            raise ValueError(f"{len(grids[tok])} {kind} grids given but {k} placeholder runs found")
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    rope_delta = (int(positions.max()) + 1 - n) if n else 0
    return positions.long(), rope_delta


def decode_positions(cache_index: int, rope_delta: int) -> torch.Tensor:
    """Positions [3, 1] for the token at `cache_index` generated after the prompt."""
    return torch.full((3, 1), cache_index + rope_delta, dtype=torch.long)
