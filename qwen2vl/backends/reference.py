"""The torch backend: the model's small ops and the paged-cache attention in plain torch.

This is the reference. Every other backend (C kernels on the CPU, Triton on CUDA) offers the same
ops with the same signatures and is tested against these; the model files call them through
`TextModel.ops` / `VisionTower.ops` and the engine through `model.backend`, never a kernel module.

An op may work in place on an argument it documents as consumed (a fast kernel rotates q/k inside
the qkv output; this code returns new tensors, so autograd can train through it): callers use the
return value and never read a consumed argument again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2vl.backends import top_k
from qwen2vl.backends.paged_attention import PagedBatch, paged_attention
from qwen2vl.backends.quant import QUANTIZATIONS, quantize_model
from qwen2vl.rotary import apply_rotary


class TorchOps:
    """The small ops of the text decoder and the vision tower, in torch, rounding where the
    Hugging Face reference rounds."""

    def for_input(self, x: torch.Tensor) -> TorchOps:
        """The ops that take activations like `x` (a kernel backend may answer with these)."""
        return self

    # --- text decoder ---
    @staticmethod
    def add_rms_norm(x, residual, weight, eps: float):
        """(RMSNorm(x + residual), x + residual), or (RMSNorm(x), x) when residual is None: the
        residual add of a sublayer fused with the norm after it. Normalized in float32, rounded to
        the activation dtype, then scaled (the reference's order)."""
        total = x if residual is None else residual + x
        xf = total.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), total

    @staticmethod
    def rotary(qkv, cos, sin, heads: int, head_dim: int) -> torch.Tensor:
        """The first `heads` heads of each row of qkv [N, >= heads * head_dim] rotated -> [N, heads,
        head_dim] (consumes qkv's first heads); cos, sin [N, head_dim] in the activation dtype."""
        return apply_rotary(qkv[:, : heads * head_dim].view(-1, heads, head_dim), cos, sin)

    @staticmethod
    def silu_mul(gate, up) -> torch.Tensor:
        return F.silu(gate) * up

    # --- vision tower ---
    @staticmethod
    def quick_gelu(x) -> torch.Tensor:
        """x * sigmoid(1.702 x) (consumes x)."""
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def vision_rotary(qkv, cos, sin, heads: int, head_dim: int) -> torch.Tensor:
        """As `rotary`, but computed in float32 (cos, sin float32) and rounded back, as the
        reference tower does."""
        x = qkv[:, : heads * head_dim].view(-1, heads, head_dim)
        return apply_rotary(x.float(), cos, sin).to(qkv.dtype)

    @staticmethod
    def softmax(scores, dim: int = -1) -> torch.Tensor:
        """torch.softmax (consumes scores)."""
        return torch.softmax(scores, dim)

    matmul_min = None  # attention.block_diagonal_attention's: its default block length for plain matmuls


TORCH_OPS = TorchOps()


class TorchBackend:
    """What the engine asks of a device: write k/v to the paged cache and attend over it, and
    (kernel backends only) a whole decode step in one call."""

    name = "torch"
    fused_prefill = False  # prefill attention through SDPA's fused kernel (paged_attention.varlen's `fused`)
    prefill_dtype = None  # and in this dtype (varlen's `dtype`; None: the activations')

    def prepare(self, model, quantization: str | None) -> None:
        """The torch code as it is: q/k/v fused into one linear, the linears quantized if asked
        (dequantized on the fly)."""
        model.fuse_qkv()
        if quantization is not None:
            quantize_model(model, *QUANTIZATIONS[quantization])

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """k, v [N, Hkv, Dh] into slots [N] (slot = block * block_size + offset) of one layer's cache."""
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)

    def attention(self, q, k, v, k_cache, v_cache, batch: PagedBatch) -> torch.Tensor:
        """Write this step's k/v to the cache, then attend q [N, Hq, Dh] over it -> [N, Hq, Dh]."""
        self.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return paged_attention(q, k, v, k_cache, v_cache, batch, self.fused_prefill, self.prefill_dtype)

    def decode_step(self, model, cache):
        """A callable running a whole decode step (x, positions, batch) -> hidden, or None: the
        engine then runs the model with `attention`."""
        return None

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's x.topk(k) over float32 logits [R, V]: values sorted, their columns."""
        return top_k.top_k(x, k)

    def describe(self) -> str:
        return self.name
