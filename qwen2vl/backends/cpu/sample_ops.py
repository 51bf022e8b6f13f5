"""ctypes binding of top_k.c: the sampler's row top-k of float32 logits in about one SIMD read of
each row (the torch version, backends/top_k.py, spends most of its time in two torch.topk calls).

Built and loaded by native.py for this CPU's tier (AVX2 or AVX-512); `library()` is None where it
can't be had, and the CPU backend then uses the torch version.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cpu import native
from qwen2vl.backends.top_k import BLOCK


def library():
    """top_k.c loaded, or None where it can't be built or run here."""
    return native.library("top_k")


def supports(x: torch.Tensor, k: int) -> bool:
    """Whether the kernel takes rows like x [R, V] (float32 on the CPU, unit column stride) and this k
    (at most a quarter of the blocks, as the torch version's narrowing)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1
            and 0 < k * 4 <= -(-x.shape[1] // BLOCK) and library() is not None)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) of x [R, V] (values sorted, ties by the smaller column): callers check supports()."""
    r, n = x.shape
    values = torch.empty(r, k)
    columns = torch.empty(r, k, dtype=torch.long)
    maxima = torch.empty(r, -(-n // BLOCK))
    library().top_k_rows(x.data_ptr(), r, n, x.stride(0), k, values.data_ptr(), columns.data_ptr(),
                         maxima.data_ptr(), torch.get_num_threads())
    return values, columns
