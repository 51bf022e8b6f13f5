"""A paged KV cache filled for a batch of sequences, with the answer plain attention gives: what the
paged-attention tests (CPU and CUDA) check their paths against."""

from __future__ import annotations

import torch

from qwen2vl.backends.paged_attention import PagedBatch
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.config import TextConfig
from qwen2vl.engine.kv_cache import KVCache

HQ, HKV, D, BS = 4, 2, 8, 4


def naive(q, k, v):
    """q [n, Hq, D] are the last n of the ctx keys k/v [ctx, Hkv, D]."""
    n, ctx = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def build(cached: list[int], new: list[int], seed=0, consecutive=False, fill: float | None = None):
    """Fill a cache for sequences with `cached` tokens already in it and `new` tokens this step;
    block tables are shuffled so that no sequence's blocks are contiguous (unless `consecutive`).
    `fill`: what the slots hold before anything is written (the cache is allocated uninitialized)."""
    g = torch.Generator().manual_seed(seed)
    cfg = TextConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, num_hidden_layers=1,
                     mrope_section=(1, 1, 2))
    cache = KVCache(cfg, 64, BS, torch.float32, "cpu")
    if fill is not None:
        cache.k.fill_(fill), cache.v.fill_(fill)
    free = list(range(63, 2, -1)) if consecutive else torch.randperm(64, generator=g).tolist()
    tables, slots, ks, vs, qs, q_starts = [], [], [], [], [], []
    full = []
    n_rows = 0
    for c, n in zip(cached, new):
        ctx = c + n
        table = [free.pop() for _ in range(-(-ctx // BS))]
        k, v = torch.randn(ctx, HKV, D, generator=g), torch.randn(ctx, HKV, D, generator=g)
        seq_slots = torch.tensor([table[i // BS] * BS + i % BS for i in range(ctx)])
        TorchBackend().write_kv(k[:c], v[:c], *cache.layers[0], seq_slots[:c])  # what earlier steps wrote
        full.append((k, v))
        tables.append(table)
        slots.append(seq_slots[c:])
        ks.append(k[c:])
        vs.append(v[c:])
        qs.append(torch.randn(n, HQ, D, generator=g))
        q_starts.append(n_rows)
        n_rows += n
    width = max(map(len, tables))
    ctx_lens = [c + n for c, n in zip(cached, new)]
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    batch = PagedBatch(
        slot_mapping=torch.cat(slots), q_starts=q_starts, q_lens=list(new), ctx_lens=ctx_lens,
        ctx_slots=PagedBatch.context_slots(block_tables, BS, max(ctx_lens), torch.tensor(ctx_lens)),
        ctx_lens_t=torch.tensor(ctx_lens),
    )
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    TorchBackend().write_kv(k, v, *cache.layers[0], batch.slot_mapping)  # what the step's attention does first
    want = torch.cat([naive(qq, kk, vv) for qq, (kk, vv) in zip(qs, full)])
    return q, k, v, cache, batch, want
