"""Without a GPU, Triton kernels run in Triton's interpreter on the CPU (tests/test_triton_layer_ops.py).
The switch is read when triton is first imported, which any test module may do: so here, first.

Tests keep no packed-weight cache files in the user's cache (backends/cpu/packed_cache.py); its own
tests point it at a folder of theirs."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("QWEN2VL_PACKED_CACHE", "0")
