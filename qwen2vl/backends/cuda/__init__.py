"""The CUDA backend: Triton kernels for the small ops, loaded only where they prove themselves.

Each triton_*.py module here has a `check(device)` that runs its kernels against the torch code
on random data; `triton_kernels(name, device)` imports and checks a module once, and is None
(logged) where triton doesn't import, a kernel doesn't compile or its numbers are wrong: the model
then keeps torch's ops. A graphed decode step is bound by kernel launches as much as by weight
reads, so the decoder's ~30 tiny kernels per layer become 5, gate and up become one linear, and
k and v are written to the cache in one launch. The decode CUDA graphs themselves are the engine's
(engine/cuda_graph.py); their attention is triton_decode.py here.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from qwen2vl.backends.kernel_ops import TextKernels, VisionKernels
from qwen2vl.backends.quant import QUANTIZATIONS, quantize_model
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.backends.repack import repack_checkpoint_linears
from qwen2vl.gptq import QuantizedLinear

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


class CudaBackend(TorchBackend):
    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.layer_ops = None  # triton_layer_ops where it loads, for the one-launch k/v write
        self.int_gemm = False  # whether a GPTQ/AWQ checkpoint's linears run on triton_int_gemm

    def prepare(self, model, quantization: str | None) -> None:
        model.fuse_qkv()
        model.fuse_gate_up()  # one launch fewer per layer in the decode graph (not on the CPU: no gain there)
        # a GPTQ/AWQ checkpoint's linears on the W4A16/W8A16 kernel where it loads (16-bit models), else
        # repack.py's layouts, which dequantize per call here
        int_gemm = None
        if model.dtype in (torch.bfloat16, torch.float16) and any(isinstance(m, QuantizedLinear)
                                                                   for m in model.modules()):
            kernels = triton_kernels("triton_int_gemm", self.device)
            int_gemm = None if kernels is None else kernels.int_gemm
        repack_checkpoint_linears(model, int_gemm)
        self.int_gemm = int_gemm is not None
        if quantization is not None:
            quantize_model(model, *QUANTIZATIONS[quantization])
        if model.dtype != torch.bfloat16:
            return
        takes = lambda x: x.is_cuda and x.dtype == torch.bfloat16
        if (ops := triton_kernels("triton_layer_ops", self.device)) is not None:
            model.model.ops, self.layer_ops = TextKernels(ops, takes), ops
        if model.visual is not None and (ops := triton_kernels("triton_vision_ops", self.device)) is not None:
            model.visual.ops = VisionKernels(ops, takes)  # the attention's softmax stays in SDPA

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        if self.layer_ops is None or not self.layer_ops.write_kv(k, v, k_cache, v_cache, slot_mapping):
            super().write_kv(k, v, k_cache, v_cache, slot_mapping)

    def describe(self) -> str:
        return (f"cuda ({torch.cuda.get_device_name(self.device)}), Triton ops: {self.layer_ops is not None}, "
                f"GPTQ/AWQ W4A16/W8A16 kernel: {self.int_gemm}")
