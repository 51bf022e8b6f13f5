"""The CPU backend: C kernels for this CPU's tier, and the compute-dtype policy.

isa.py says what the CPU can run (tiers none < avx2 < avx512 < amx, capped by QWEN2VL_CPU_ISA),
native.py builds and loads the kernels in csrc/ for it. `CpuBackend.prepare` swaps them in after
load:
- linears: quantized (int8/int4: our kernel where built, else torch's weight-only kernels; a
  GPTQ/AWQ checkpoint's repacked into them, repack.py) or FastLinear (linear.py);
- the decoder's small ops (layer_ops), the vision tower's (vision_ops), decode attention over the
  paged cache in one call per layer, and, when every decoder linear is one of our kernels', the
  whole decode step in one C call (decode_step.py);
- the sampler's top-k over float32 logits (sample_ops), whatever the model's dtype.

The compute-dtype policy: where the CPU has no native bf16 matmul (no AVX-512 BF16, no AMX), torch
emulates bf16 GEMMs ~6-10x slower than float32, so a bf16 model keeps its bf16 weights and KV cache
but its matmuls run in float32: the decoder's linears convert activations on the way in and out,
the vision tower (GEMMs and attention, all compute-bound) runs in float32 throughout, and prefill
attention runs SDPA's fused kernel on float32 copies of q/k/v.

Its one knob, `matmul="int8"` (LLM's argument, Isa.matmul_dtype): the matmul-heavy phases in int8
(int8_mm.py): the vision tower's linears become int8 codes, and each decoder linear gets int8 codes
beside it (an int8 model's own) for calls of more than 4 rows, prefill's; decode rows keep the path
above, and prefill attention runs SDPA's fused kernel (paged_attention.varlen's `fused`). Off by
default: it trades accuracy for time to first token (docs/performance.md).
"""

from __future__ import annotations

import logging

import torch

from qwen2vl.backends.cpu import int8_mm, isa, layer_ops, native, sample_ops, vision_ops
from qwen2vl.backends.cpu.decode_step import DecodeStep
from qwen2vl.backends.cpu.int8_mm import use_int8_matmuls
from qwen2vl.backends.cpu.linear import FastLinear, speed_up_linears
from qwen2vl.backends.cpu.packed_cache import PackedCache
from qwen2vl.backends.kernel_ops import TextKernels, VisionKernels
from qwen2vl.backends.quant import QUANTIZATIONS, quantize_model
from qwen2vl.backends.reference import TorchBackend
from qwen2vl.backends.repack import repack_checkpoint_linears

HALF = (torch.bfloat16, torch.float16)
log = logging.getLogger(__name__)


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, matmul: str | None = None, checkpoint=None):
        self.isa = isa.current()
        self.checkpoint = checkpoint  # the model's folder: its packed weights are cached (packed_cache.py)
        self.matmul = matmul  # LLM's knob for the matmul-heavy phases (Isa.matmul_dtype)
        self.fused_decode = False  # decode attention through paged_decode.c (set where the layer ops are in)

    def prepare(self, model, quantization: str | None) -> None:
        model.fuse_qkv()
        repack_checkpoint_linears(model)  # a GPTQ/AWQ checkpoint's linears into our int kernels' layouts
        if quantization is not None:
            quantize_model(model, *QUANTIZATIONS[quantization])
        dtype = model.dtype
        compute = self.isa.matmul_dtype(dtype)
        heavy = self.isa.matmul_dtype(dtype, self.matmul)  # the vision tower's and prefill's
        if heavy == torch.int8 and int8_mm.library() is None:
            log.warning("matmul='int8': the int8_mm kernel did not load here; matmuls stay in %s", compute)
            heavy = compute
        # with AMX, SDPA's fused kernel attends in bf16 on the tiles: the vision tower's blocks faster than plain
        # matmuls (attention.py), prefill 3.4-4.2x the math path's speed a layer of the 2B's 283-token prefill on a
        # 2-vCPU Xeon (benchmarks/attention_cpu.py)
        sdpa_on_tiles = compute == torch.bfloat16 and self.isa.has("amx_bf16")
        emulated = dtype in HALF and compute == torch.float32  # a 16-bit model whose matmuls run in float32
        # in float32 on an Intel CPU SDPA's fused kernel also beats plain matmuls at every block length: 1.4-2x on
        # an Ice Lake Xeon (1024 patches: 26 against 52 ms a layer; AVX2-capped 58 against 98), whose 16 MB of
        # float32 scores a slab the plain matmuls walk through memory. Not measured on AMD in float32 (a Zen 5's
        # bf16 took matmuls 2x faster: attention.py), so AMD keeps them until benchmarks/attention_cpu.py says
        sdpa_vision = sdpa_on_tiles or (emulated and self.isa.vendor == "GenuineIntel")
        # SDPA's fused kernel for prefill attention: there, with the int8 knob in effect (its kernel loaded), which
        # trades bits for TTFT, and where matmuls are emulated, on float32 copies: the math path upcasts to float32
        # itself, and the fused kernel keeps its accuracy at 0.5x its time a layer of 283 tokens, 0.28x of 1,024,
        # 0.25x of 4,096 (1.5 s of a layer; an Ice Lake Xeon, benchmarks/attention_cpu.py)
        self.fused_prefill = heavy == torch.int8 or sdpa_on_tiles or emulated
        self.prefill_dtype = torch.float32 if emulated else None
        if heavy == torch.int8:
            # decode rows (SMALL_ROWS or fewer a call) keep the linear they had: FastLinear, an Int8Linear
            fast = None if dtype == torch.float32 else (
                lambda linear: FastLinear.from_linear(linear, compute_dtype=compute))
            use_int8_matmuls(model.model, small=fast if fast is not None else lambda linear: linear)
            use_int8_matmuls(model.visual)
        if dtype not in HALF:  # float32: torch's own GEMMs (MKL / oneDNN) are the fast ones
            return
        # decode streams every weight once per token; FastLinears (our bf16 or bf16w kernel, else oneDNN) stream at
        # about the memory read rate where F.linear's bf16 GEMV gets ~30-70% of it, and the vision tower's
        # GEMMs run faster too (docs/performance.md). Quantized linears are not nn.Linear and stay as they are.
        cache = None if self.checkpoint is None else PackedCache.open(self.checkpoint, dtype)
        speed_up_linears(model, skip=("visual",), compute_dtype=compute, cache=cache)
        # the vision tower's GEMMs are compute-bound: no huge pages, which cost load time (the
        # kernel compacts memory to find them). A tensor-parallel rank other than 0 has no tower.
        tower = model.visual
        if tower is not None:
            speed_up_linears(tower, skip=(), huge_pages=False, compute_dtype=compute, cache=cache, prefix="visual.")
            if compute != dtype:  # the tower computes in the dtype of its norms (vision.py)
                tower.compute_in(compute)
        if cache is not None:
            cache.save()
        cfg = model.config.text
        if dtype == torch.bfloat16 and layer_ops.available() and layer_ops.supports_layout(
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim):
            model.model.ops = TextKernels(layer_ops, layer_ops.supports)
            self.fused_decode = True
        if tower is not None and vision_ops.library() is not None:  # bf16, or float32 where it computes in that
            tower.ops = VisionKernels(vision_ops, vision_ops.supports, matmul_min=0 if sdpa_vision else None)

    def attention(self, q, k, v, k_cache, v_cache, batch):
        if self.fused_decode and batch.is_decode and q.dtype == torch.bfloat16:
            # one C call writes k/v to the cache and attends over it in place
            return layer_ops.paged_decode(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.ctx_slots,
                                          batch.ctx_lens_t)
        return super().attention(q, k, v, k_cache, v_cache, batch)

    def decode_step(self, model, cache):
        return DecodeStep.build(model.model, cache) if self.fused_decode else None

    def top_k(self, x, k):
        return sample_ops.top_k(x, k) if sample_ops.supports(x, k) else super().top_k(x, k)

    def describe(self) -> str:
        libs = [name for name in native.VARIANTS if native.library(name) is not None]
        return f"cpu, tier {self.isa.tier}, kernels: {', '.join(libs) or 'none'}"

