"""Attention of packed queries over the paged KV cache.

Every step packs the new tokens of all its sequences into N rows. Sequence i owns query rows
[q_start, q_start + q_len) and attends to its first ctx_len cache slots (ctx_len = tokens cached
before this step + q_len): the query at row q_start + j sits at cache index ctx_len - q_len + j
and sees keys 0..that index (causal, aligned bottom-right).

`ctx_slots[i, c]` is the cache slot of sequence i's token c, computed once per step from the block
tables. Each layer reads its keys with one `index_select` over those slots: a plain row gather,
several times cheaper on CPU than indexing the 4-D cache by block ids. Past a sequence's length
the row is padded with its first slot: the cache is allocated uninitialized (kv_cache.py), and a
padded key or value read from a slot nothing wrote could hold NaN or Inf, which a masked score
does not stop (0 x NaN is NaN in the softmax-weighted sum); its own first key is always real.

Two paths, checked against each other in tests:
- `varlen`: one SDPA per sequence (any mix of prefill chunks and decodes). A sequence with nothing
  cached before this step attends over its fresh k/v directly; others gather their slots.
- `decode`: every sequence has q_len 1; one gather padded to the longest context and one batched
  SDPA with a key-length mask (none when all lengths are equal, as at batch 1). A kv head's query
  heads are folded into query rows, so k/v are never repeated for GQA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedBatch:
    slot_mapping: torch.Tensor  # [N] long: cache slot of each packed token (where its k/v go)
    q_starts: list[int]
    q_lens: list[int]
    ctx_lens: list[int]
    ctx_slots: torch.Tensor  # [B, max(ctx_lens)] long: cache slot of every context token
    ctx_lens_t: torch.Tensor  # [B] long, on the cache's device
    # one sequence whose blocks are consecutive (common for a lone stream: the free list hands out
    # blocks in order): its first slot, so decode reads its keys as a slice, with no gather
    ctx_run: int | None = None

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @staticmethod
    def context_slots(block_tables: torch.Tensor, block_size: int, max_ctx: int,
                      ctx_lens: torch.Tensor) -> torch.Tensor:
        """[B, max_blocks] block ids (padded with anything) and ctx_lens [B] (>= 1) -> [B, max_ctx]
        slots, each row padded past its length with its first slot (module docstring). Reads no
        host value: the CUDA-graph runner captures it."""
        offsets = torch.arange(block_size, device=block_tables.device)
        slots = (block_tables[:, :, None] * block_size + offsets).flatten(1)[:, :max_ctx]
        past = torch.arange(slots.shape[1], device=slots.device) >= ctx_lens[:, None]
        return torch.where(past, slots[:, :1], slots)



class PagedAttend:
    """The decoder's `attend` for one engine step: write this step's k/v to layer `layer`'s cache,
    then attend over it, through `backend`. An object rather than a closure so a tensor-parallel rank
    can rebuild it from the broadcast batch (parallel/step.py)."""

    def __init__(self, backend, layers: list, batch: PagedBatch):
        self.backend, self.layers, self.batch = backend, layers, batch

    def __call__(self, layer: int, q, k, v) -> torch.Tensor:
        return self.backend.attention(q, k, v, *self.layers[layer], self.batch)

def paged_attention(q, k, v, k_cache, v_cache, batch: PagedBatch, fused: bool = False,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [N, Hq, Dh], fresh k/v [N, Hkv, Dh] (already written to the cache),
    k_cache/v_cache [num_blocks, block_size, Hkv, Dh] of one layer -> [N, Hq, Dh]. `fused`, `dtype`
    (prefill's): see varlen."""
    if batch.is_decode:
        return decode(q, k_cache, v_cache, batch)
    return varlen(q, k, v, k_cache, v_cache, batch, fused, dtype)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a [num_blocks, block_size, Hkv, Dh] cache at `slots` -> [*slots.shape, Hkv, Dh]."""
    flat = cache.view(-1, *cache.shape[2:])
    return flat.index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[2:])


def varlen(q, k, v, k_cache, v_cache, batch: PagedBatch, fused: bool = False,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """`fused`: SDPA on 4-D inputs, which its fused CPU (flash) kernel takes, instead of the 3-D ones
    that run its unfused math path (the default, whose bits the engine's tests pin). In bf16 on 2
    AVX2 cores (no bf16 matmuls) the fused one took 0.25x the math path's time a layer of the 2B's
    283-token prefill (12 vs 42 ms, shared machine), relative error vs float32 0.0019 against 0.0016
    (benchmarks/attention_cpu.py); matmul="int8" asks for it. `dtype`: what SDPA computes in (q's by
    default); float32 copies give the fused kernel the math path's accuracy (the math path upcasts
    bf16 itself), which the CPU backend asks for where bf16 matmuls would be emulated."""
    out = torch.empty_like(q)
    for i, (start, n, ctx) in enumerate(zip(batch.q_starts, batch.q_lens, batch.ctx_lens)):
        rows = slice(start, start + n)
        mask = None
        if n == ctx:  # nothing cached before: causal over the fresh keys
            kk, vv, causal = k[rows], v[rows], n > 1
        else:
            slots = batch.ctx_slots[i, :ctx]
            kk, vv = _gather(k_cache, slots), _gather(v_cache, slots)  # [ctx, Hkv, Dh]
            causal = False
            if n > 1:  # query j sees keys up to ctx - n + j
                idx = torch.arange(ctx, device=q.device)
                mask = idx[None, :] <= idx[ctx - n :, None]
        qh, kh, vh = (x.transpose(0, 1).to(dtype or x.dtype) for x in (q[rows], kk, vv))  # [H, n, Dh]
        if fused:
            qh, kh, vh = qh[None], kh[None], vh[None]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, enable_gqa=True)
        out[rows] = o.view(o.shape[-3:]).transpose(0, 1)  # [Hq, n, Dh] -> [n, Hq, Dh]
    return out


def decode(q, k_cache, v_cache, batch: PagedBatch) -> torch.Tensor:
    if batch.ctx_run is not None:  # one sequence in consecutive slots: a view instead of two gathers
        run = slice(batch.ctx_run, batch.ctx_run + batch.ctx_lens[0])
        kk, vv = (c.view(-1, *c.shape[2:])[run][None] for c in (k_cache, v_cache))  # [1, L, Hkv, Dh]
        return _attend_grouped(q, kk, vv, None)
    equal = min(batch.ctx_lens) == max(batch.ctx_lens)  # no padding to mask
    return decode_padded(q, k_cache, v_cache, batch.ctx_slots, None if equal else batch.ctx_lens_t)


def decode_padded(q, k_cache, v_cache, ctx_slots: torch.Tensor, ctx_lens: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, Dh] over the keys at ctx_slots [B, L], masked past ctx_lens [B] (None: all L real).
    Reads no host value, so the CUDA-graph runner captures it as its torch fallback."""
    return _attend_grouped(q, _gather(k_cache, ctx_slots), _gather(v_cache, ctx_slots), ctx_lens)


def _attend_grouped(q, kk, vv, ctx_lens: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, Dh] over kk, vv [B, L, Hkv, Dh], masked past ctx_lens [B] (None: all L real).

    A kv head's query heads are folded into query rows, so k/v are never repeated for GQA."""
    b, hq, dh = q.shape
    hkv = kk.shape[2]
    kk, vv = kk.transpose(1, 2), vv.transpose(1, 2)  # [B, Hkv, L, Dh]
    mask = None
    if ctx_lens is not None:  # additive mask over the padding
        idx = torch.arange(kk.shape[2], device=q.device)
        pad = (idx[None, :] >= ctx_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        mask = torch.zeros(pad.shape, dtype=q.dtype, device=q.device).masked_fill_(pad, float("-inf"))
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, dh), kk, vv, attn_mask=mask)
    return o.reshape(b, hq, dh)
