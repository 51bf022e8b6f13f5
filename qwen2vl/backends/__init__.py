"""The speed seam: everything that makes the model fast on a given device lives under here.

- `reference.py`: the torch backend, the reference every other backend is tested against: the
  model's small ops (`TorchOps`) and attention over the paged KV cache (paged_attention.py);
- `cpu/`: C kernels compiled per CPU tier (isa.py says what the CPU can run and takes the
  QWEN2VL_CPU_ISA cap, native.py builds and loads csrc/), FastLinear, the compute-dtype policy;
- `cuda/`: Triton kernels checked against torch at load;
- `quant.py`: int8/int4 linears (our CPU kernels' layouts, torch's, or dequantize); `repack.py`
  turns a GPTQ/AWQ checkpoint's linears (gptq.py) into them, or on CUDA into `packed_linear.py`'s,
  which run the Triton W4A16/W8A16 kernel;
- `kernel_ops.py`: TorchOps' interface over the C and Triton kernel modules.

`prepare(model, quantization, matmul)` picks the backend for the model's device once, at load, swaps its
speed-ups in (the model files never know which) and leaves it at `model.backend`, which the engine
asks for attention over the cache and, where there is one, a whole decode step. Nothing here
imports the model files or the engine.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cpu.isa import MATMULS
from qwen2vl.backends.quant import QUANTIZATIONS
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.gptq import QuantizedLinear


def backend_for(device: torch.device, matmul: str | None = None, checkpoint=None) -> TorchBackend:
    """The backend for `device`: C kernels on the CPU, Triton on CUDA, plain torch elsewhere.
    `matmul` (CPU only): "int8" for the matmul-heavy phases (cpu/isa.py, Isa.matmul_dtype).
    `checkpoint` (CPU only): the model's folder, whose packed weights the CPU keeps on disk
    (cpu/packed_cache.py)."""
    if matmul is not None and device.type != "cpu":
        raise ValueError(f"matmul={matmul!r} is a CPU policy (the int8_mm kernel); this model is on {device.type}")
    if device.type == "cpu":
        from qwen2vl.backends.cpu.backend import CpuBackend

        return CpuBackend(matmul, checkpoint)
    if device.type == "cuda":
        from qwen2vl.backends.cuda import CudaBackend

        return CudaBackend(device)
    return TorchBackend()


def prepare(model, quantization: str | None = None, matmul: str | None = None, checkpoint=None) -> TorchBackend:
    """Swap the fast paths for the model's device and dtype in, once, after load; the backend is
    left at model.backend. `matmul="int8"`: the CPU's vision tower and prefill in int8 (MATMULS).
    `checkpoint`: the folder the model was loaded from, where the backend may cache by it."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization is not None and any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(f"the checkpoint is quantized already (GPTQ/AWQ); leave out quantization={quantization!r}")
    if matmul is not None and matmul not in MATMULS:
        raise ValueError(f"matmul must be None or one of {', '.join(MATMULS)}, got {matmul!r}")
    backend = backend_for(model.device, matmul, checkpoint)
    backend.prepare(model, quantization)
    model.backend = backend
    return backend
