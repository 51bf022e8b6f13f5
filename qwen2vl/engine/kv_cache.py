"""The paged KV cache: per layer, [num_blocks, block_size, Hkv, Dh] for keys and for values.

Sized from a memory budget, never from max_len x batch: on CPU a number of GiB, on CUDA a fraction
of the card (`gpu_memory_utilization`) minus what the weights and a measured forward pass use.
Allocated uninitialized (zero-filling touched every page at start-up: 2.2-2.9 s for the default
2 GiB on our CPU VM, benchmarks/cache_startup.py): no attention path reads a slot before it is
written. The C and Triton decode kernels stop at each sequence's length, and the torch paths
gather padded rows from a sequence's own first slot (paged_attention.py); tests fill a fresh
cache with NaN to hold them to it. Writing into it is the
backend's (`model.backend.write_kv`).
"""

from __future__ import annotations

import torch

from qwen2vl.config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # per-layer views, taken once: indexing self.k[layer] is a torch op (~1 us on CPU), paid twice
        # per layer and step
        self.layers = list(zip(self.k, self.v))
        self.num_blocks = num_blocks
        self.block_size = block_size


def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


def num_blocks_for(cfg: TextConfig, block_size: int, dtype: torch.dtype, device: torch.device, *,
                   kv_cache_gib: float | None, gpu_memory_utilization: float, peak_bytes: int = 0) -> int:
    """How many blocks the budget pays for.

    CPU: `kv_cache_gib` (default 2 GiB). CUDA: `kv_cache_gib` if given, else
    `gpu_memory_utilization` x total memory minus what is in use now (weights, other processes)
    minus `peak_bytes`, the activation peak the runner measured for its largest step.
    """
    per_block = bytes_per_block(cfg, block_size, dtype)
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        budget = kv_cache_gib * 2**30
    elif device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - (total - free) - peak_bytes
    else:
        budget = 2 * 2**30
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise ValueError(
            f"the KV-cache budget ({budget / 2**30:.2f} GiB) does not hold one block of {block_size} tokens "
            f"({per_block / 2**20:.1f} MiB); raise kv_cache_gib or gpu_memory_utilization"
        )
    return num_blocks
