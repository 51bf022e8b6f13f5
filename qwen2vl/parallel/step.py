"""One decoder forward, sent from rank 0 to the other ranks and rebuilt there.

Rank 0 runs the model as one process would; a pre-hook on its decoder (group.py) sends every call
`model.model(x, positions, attend)` to the other ranks before it runs, so all ranks run the same
forward on their shards and meet at its all-reduces. A call travels as:
- a small message on each rank's pipe: the shapes and the host-side lists of the batch;
- two broadcasts: the embeddings x [N, D], and one long tensor packing positions [3, N] with, for
  the paged cache, slot_mapping [N], ctx_slots [B, C] and ctx_lens [B].

`attend` is one of two kinds: the engine's `PagedAttend` (rebuilt over the rank's own cache) or a
cache-free causal attend over packed sequences (`Qwen2VL.logits`, embeddings, CUDA's profiling run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qwen2vl.attention import causal_attend, packed_causal_attend
from qwen2vl.backends.paged_attention import PagedAttend, PagedBatch


def send(conns, x: torch.Tensor, positions: torch.Tensor, attend) -> None:
    """Rank 0: describe this forward to every other rank, then broadcast its tensors."""
    n = x.shape[0]
    parts = [positions.reshape(-1)]
    if isinstance(attend, PagedAttend):
        b = attend.batch
        meta = ("paged", b.q_starts, b.q_lens, b.ctx_lens, b.ctx_run, tuple(b.ctx_slots.shape))
        parts += [b.slot_mapping, b.ctx_slots.reshape(-1), b.ctx_lens_t]
    elif attend is causal_attend or hasattr(attend, "cu_seqlens"):
        meta = ("packed", getattr(attend, "cu_seqlens", [0, n]))
    else:
        raise TypeError(f"tensor parallelism can't send this attend to the other ranks: {attend!r}")
    ints = torch.cat(parts).long()
    message = ("forward", tuple(x.shape), x.dtype, ints.numel(), meta)
    for conn in conns:
        conn.send(message)
    dist.broadcast(x.contiguous(), 0)
    dist.broadcast(ints, 0)


def receive(message, device, backend, cache):
    """Ranks > 0: (x, positions, attend) of the forward `message` announced, after its broadcasts."""
    _, shape, dtype, count, meta = message
    x = torch.empty(shape, dtype=dtype, device=device)
    ints = torch.empty(count, dtype=torch.long, device=device)
    dist.broadcast(x, 0)
    dist.broadcast(ints, 0)
    n = shape[0]
    positions = ints[: 3 * n].view(3, n)
    if meta[0] == "packed":
        return x, positions, packed_causal_attend(meta[1])
    _, q_starts, q_lens, ctx_lens, ctx_run, (b, c) = meta
    assert cache is not None, "a paged forward before the engine sized the cache"
    slots, ctx_slots, ctx_lens_t = ints[3 * n :].split([n, b * c, b])
    batch = PagedBatch(slot_mapping=slots, q_starts=q_starts, q_lens=q_lens, ctx_lens=ctx_lens,
                       ctx_slots=ctx_slots.view(b, c), ctx_lens_t=ctx_lens_t, ctx_run=ctx_run)
    return x, positions, PagedAttend(backend, cache.layers, batch)
