"""Attention functions the model is given; the modules themselves never hold a cache.

The decoder calls `attend(layer, q, k, v)` with q [N, Hq, D] and k, v [N, Hkv, D] (rotary already
applied) and expects [N, Hq, D] back. `causal_attend` serves one whole sequence with no cache (tests,
tools, `Qwen2VL.logits`); the engine passes its own paged-cache `attend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )  # [Hq, N, D]
    return out.transpose(0, 1)


def block_diagonal_attention(q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
    """Non-causal attention within each [cu_seqlens[i], cu_seqlens[i+1]) block, none across.

    q, k, v [N, H, D] -> [N, H, D]. One SDPA call per block (an image, or one temporal patch pair
    of a video) so no N x N mask is ever built.
    """
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
    return out
