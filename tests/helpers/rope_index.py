"""The M-RoPE rule of the original Qwen2-VL / Qwen2.5-VL releases, written out token by token as an
oracle independent of qwen2vl/positions.py.

The original `get_rope_index` (transformers 4.49-4.51, also vLLM's) starts each text run at the
largest position so far + 1 and gives a video's grid step t the temporal index
int(float32(t) * float32(second_per_grid_t) * tokens_per_second); transformers 5 resumes after a
vision block at max(h, w) / merge instead (docs/parity.md), so it can't serve as the oracle there.
"""

from __future__ import annotations

import numpy as np
import torch


def original_rope_index(ids, image_grids, video_grids, second_per_grid_ts, config) -> tuple[torch.Tensor, int]:
    """(positions [3, L], rope_delta) of one unpadded sequence."""
    merge, tps = config.vision.spatial_merge_size, config.vision.tokens_per_second
    grids = {config.image_token_id: list(image_grids or []), config.video_token_id: list(video_grids or [])}
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else [1.0] * len(grids[config.video_token_id])
    used = {config.image_token_id: 0, config.video_token_id: 0}
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(ids):
        start = max(max(p) for p in out) + 1 if out else 0
        if ids[i] not in grids:
            out.append((start, start, start))
            i += 1
            continue
        k = used[ids[i]]
        t, h, w = (int(x) for x in grids[ids[i]][k])
        is_video = ids[i] == config.video_token_id
        used[ids[i]] += 1
        for ti in range(t):
            if is_video and tps is not None:
                time = int(np.float32(ti) * np.float32(float(seconds[k])) * np.float32(tps))
            else:
                time = ti
            for hi in range(h // merge):
                for wi in range(w // merge):
                    out.append((start + time, start + hi, start + wi))
        i += t * (h // merge) * (w // merge)
    positions = torch.tensor(out, dtype=torch.long).T
    return positions, int(positions.max()) + 1 - len(ids)
