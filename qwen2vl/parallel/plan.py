"""Which slice of each checkpoint tensor a tensor-parallel rank holds (Megatron's split).

Per decoder layer, N ranks:
- column-parallel (output rows split): q/k/v (weights and biases), gate and up. Rank r holds query
  heads [r H/N, (r+1) H/N) and the KV heads those queries read: KV/N of them when N divides KV, else
  (N a multiple of KV) the one KV head its query heads share, held by N/KV ranks alike;
- row-parallel (input columns split): o (over heads) and down (over the MLP width). Each rank's
  output is a partial sum, all-reduced once (shard.py). Neither has a bias, so nothing is added twice;
- replicated: the norms (a few KB).

Only rank 0 holds the rest: the embedding, the head and the vision tower. The scheduler, the
processor and the sampler live on rank 0, which embeds the step's tokens (vision rows scattered in)
and broadcasts the [N, D] embeddings, so the other ranks need neither table nor tower; rank 0 alone
computes logits from the full hidden state every rank ends with. That costs one broadcast of N x D
per step (3 KB a bf16 decode token at 2B) and keeps the head exact, where a vocabulary-parallel
head would all-gather [N, vocab] float32 logits (600 KB a token) for a sampler that needs every
column anyway.
"""

from __future__ import annotations

import re
from dataclasses import replace

from qwen2vl.config import TextConfig

_COLUMN = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.(weight|bias)$")
_ROW = re.compile(r"^model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")
_LAYER_NORMS = re.compile(r"^model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight$")


def check_tensor_parallel(cfg: TextConfig, n: int) -> None:
    """A ValueError naming the numbers when `n` ranks can't split this decoder evenly."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
    heads, kv, width = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if heads % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's {heads} attention heads")
    if kv % n and n % kv:
        raise ValueError(f"tensor_parallel_size {n} and the model's {kv} KV heads: one must divide the other "
                         "(KV heads are split, or replicated when there are fewer than ranks)")
    if width % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the MLP width (intermediate_size {width})")


def rank_config(cfg: TextConfig, n: int) -> TextConfig:
    """The decoder one rank runs: its share of the heads and of the MLP width, head_dim unchanged."""
    return replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                   num_key_value_heads=max(cfg.num_key_value_heads // n, 1),
                   intermediate_size=cfg.intermediate_size // n)


class ShardPlan:
    """Rank `rank` of `n`: which tensors it loads and the slice of each (loader.py reads only that)."""

    def __init__(self, cfg: TextConfig, rank: int, n: int):
        check_tensor_parallel(cfg, n)
        assert 0 <= rank < n
        self.cfg, self.rank, self.n = cfg, rank, n

    def keeps(self, name: str) -> bool:
        """Rank 0 loads everything; the others only the decoder layers and norms (module docstring)."""
        return self.rank == 0 or bool(_COLUMN.match(name) or _ROW.match(name) or _LAYER_NORMS.match(name))

    def slice(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of the checkpoint tensor `name` (canonical) this rank holds; None: all of it."""
        cfg, r, n = self.cfg, self.rank, self.n
        d = cfg.head_dim
        if m := _COLUMN.match(name):
            proj = m.group(1)
            if proj in ("self_attn.k_proj", "self_attn.v_proj"):
                kv = cfg.num_key_value_heads
                if kv >= n:  # split: KV/N heads each
                    return 0, r * kv // n * d, (r + 1) * kv // n * d
                head = r * cfg.num_attention_heads // n // (cfg.num_attention_heads // kv)  # the group of r's queries
                return 0, head * d, (head + 1) * d
            rows = cfg.num_attention_heads * d if proj == "self_attn.q_proj" else cfg.intermediate_size
            return 0, r * rows // n, (r + 1) * rows // n
        if m := _ROW.match(name):
            cols = cfg.num_attention_heads * d if m.group(1) == "self_attn.o_proj" else cfg.intermediate_size
            return 1, r * cols // n, (r + 1) * cols // n
        return None
