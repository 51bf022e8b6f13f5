"""Attention functions the model is given; the modules themselves never hold a cache.

The decoder calls `attend(layer, q, k, v)` with q [N, Hq, D] and k, v [N, Hkv, D] (rotary already
applied) and expects [N, Hq, D] back. `causal_attend` serves one whole sequence with no cache (tests,
tools, `Qwen2VL.logits`); the engine passes its own paged-cache `attend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # [N, H, D] -> [1, H, N, D]: SDPA's fused CPU (flash) kernel takes only 4-D inputs; 3-D ones
    # fall back to the unfused math path, about 2x slower for the vision tower
    return x.transpose(0, 1).unsqueeze(0)


def causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), is_causal=True,
                                         enable_gqa=True)  # [1, Hq, N, D]
    return out[0].transpose(0, 1)


def block_diagonal_attention(q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
    """Non-causal attention within each [cu_seqlens[i], cu_seqlens[i+1]) block, none across.

    q, k, v [N, H, D] -> [N, H, D]. One SDPA call per block (an image, or one temporal patch pair
    of a video) so no N x N mask is ever built.
    """
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (_heads_first(x[start:end]) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
    return out
