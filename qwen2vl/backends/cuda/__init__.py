"""CUDA speed-ups: Triton kernels for the small ops, loaded only where they prove themselves.

Each triton_*.py module here has a `check(device)` that runs its kernels against the torch code
on random data; `triton_kernels(name, device)` imports and checks a module once, and is None
(logged) where triton doesn't import, a kernel doesn't compile or its numbers are wrong: callers
then keep torch's ops.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def triton_kernels(name: str, device: torch.device):
    """The Triton module qwen2vl.backends.cuda.<name> where triton imports and the module's
    check(device) passes, else None, logged once."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
        module.check(device)
        return module
    except Exception as e:
        log.warning("Triton kernels %s unavailable (%s: %s); torch's ops stay", name, type(e).__name__, e)
        return None
