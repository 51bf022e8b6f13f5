"""Attention of packed queries over the paged KV cache.

Every step packs the new tokens of all its sequences into N rows. Sequence i owns query rows
[q_start, q_start + q_len) and attends to its first ctx_len cache slots (ctx_len = tokens cached
before this step + q_len): the query at row q_start + j sits at cache index ctx_len - q_len + j
and sees keys 0..that index (causal, aligned bottom-right).

Two paths, checked against each other in tests:
- `varlen`: one SDPA per sequence (any mix of prefill chunks and decodes). A sequence with nothing
  cached before this step attends over its fresh k/v directly; others gather their blocks.
- `decode`: every sequence has q_len 1; gather all block tables padded to the longest, one
  batched SDPA with a key-length mask (fewer kernel launches; the padding reads block 0, finite).
  A kv head's query heads are folded into query rows, so k/v are never repeated for GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # [N] long: cache slot of each packed token
    q_starts: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with block 0
    ctx_lens_t: torch.Tensor  # [B] long, on the cache's device
    block_size: int

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)


def paged_attention(q, k, v, k_cache, v_cache, batch: PagedBatch) -> torch.Tensor:
    """q [N, Hq, Dh], fresh k/v [N, Hkv, Dh] (already written to the cache),
    k_cache/v_cache [num_blocks, block_size, Hkv, Dh] of one layer -> [N, Hq, Dh]."""
    if batch.is_decode:
        return decode(q, k_cache, v_cache, batch)
    return varlen(q, k, v, k_cache, v_cache, batch)


def varlen(q, k, v, k_cache, v_cache, batch: PagedBatch) -> torch.Tensor:
    out = torch.empty_like(q)
    for i, (start, n, ctx) in enumerate(zip(batch.q_starts, batch.q_lens, batch.ctx_lens)):
        rows = slice(start, start + n)
        mask = None
        if n == ctx:  # nothing cached before: causal over the fresh keys
            kk, vv, causal = k[rows], v[rows], n > 1
        else:
            blocks = batch.block_tables[i, : -(-ctx // batch.block_size)]
            kk = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, Hkv, Dh]
            vv = v_cache[blocks].flatten(0, 1)[:ctx]
            causal = False
            if n > 1:  # query j sees keys up to ctx - n + j
                idx = torch.arange(ctx, device=q.device)
                mask = idx[None, :] <= idx[ctx - n :, None]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
            attn_mask=mask, is_causal=causal, enable_gqa=True,
        )  # [Hq, n, Dh]
        out[rows] = o.transpose(0, 1)
    return out


def decode(q, k_cache, v_cache, batch: PagedBatch) -> torch.Tensor:
    b, hq, dh = q.shape
    hkv = k_cache.shape[2]
    kk = k_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, max_blocks * block_size, Dh]
    vv = v_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)
    mask = None
    if min(batch.ctx_lens) == max(batch.ctx_lens):  # equal lengths (always at batch 1): slice, no mask
        kk, vv = kk[:, :, : batch.ctx_lens[0]], vv[:, :, : batch.ctx_lens[0]]
    else:  # additive mask over the padding (a float mask keeps SDPA on its fused CPU kernel)
        idx = torch.arange(kk.shape[2], device=q.device)
        pad = (idx[None, :] >= batch.ctx_lens_t[:, None])[:, None, None, :]  # [B, 1, 1, L]
        mask = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill_(pad, float("-inf"))
    # GQA without repeating k/v: the Hq/Hkv query heads of one kv head become that head's query rows
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, dh), kk, vv, attn_mask=mask)
    return o.reshape(b, hq, dh)
