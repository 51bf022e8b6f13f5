"""Which dtype a training run computes in (`--dtype`): bf16 autocast where the device multiplies bf16 in
hardware, float32 elsewhere.

Where bf16 matmuls are emulated (a CPU without AVX-512 BF16 or AMX: a Zen 3, an Intel client CPU),
autocast makes every matmul of the forward and backward pass a slow bf16 one: `qwen2vl train --model demo
--full --train-vision --batch-size 8` on suite rows ran 74 tokens/s in bf16 and 1,463 in float32 on a
Zen 3 (docs/demo.md, "Training speed"). So "auto", the default, asks the same seam the engine does
(`Isa.native_bf16_matmul`); an explicit bf16 there still runs, with a warning.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cpu import isa

CHOICES = ("auto", "bf16", "fp32")


def bf16_in_hardware(device: str) -> bool:
    """Whether `device` runs bf16 matmuls natively: a CUDA card that supports them, a CPU with AVX-512 BF16
    or AMX (after QWEN2VL_CPU_ISA's cap). Other devices: no (float32 is the safe choice there)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return isa.current().native_bf16_matmul
    return False


def training_dtype(requested: str, device: str, log=print) -> str:
    """'bf16' or 'fp32' for `--dtype requested` on `device`; logs why where it is not what was asked."""
    if requested not in CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    native = bf16_in_hardware(device)
    if requested == "auto":
        return "bf16" if native else "fp32"
    if not native:
        log(f"warning: {device} has no bf16 matmuls (torch emulates them): --dtype bf16 runs 13-20x slower "
            "than --dtype fp32 here (measured on a Zen 3; the default, auto, picks fp32)")
    return "bf16"
