"""The text decoder: Qwen2 (GQA with q/k/v bias, SwiGLU, RMSNorm) with M-RoPE.

Stateless: `forward(x, positions, attend)` takes packed tokens [N, D] of any number of sequences,
their M-RoPE positions [3, N] and an attention function that knows the sequence boundaries and
any cache (see attention.py). Attribute names equal the checkpoint's, so loading is a name match.

The small ops (the residual add fused with the RMSNorm after it, rotary, SiLU x up) come from
`self.ops`: the torch reference (backends/reference.py) unless a backend swapped in its kernels
at load. Each residual add is done by the norm that follows it, so a layer takes and returns the
residual stream next to the sublayer output not yet added to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from qwen2vl.backends.reference import TORCH_OPS
from qwen2vl.config import TextConfig
from qwen2vl.gptq import IntWeight, QuantizedLinear
from qwen2vl.rotary import mrope_cos_sin

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing all of `linears` on the same input (q/k/v, or gate/up).

    The output is the concatenation along the last dim; split it by the listed out_features.
    It streams the same bytes as the separate calls but pays the per-call cost once, which
    matters for the small k/v projections (256 x 1536 in the 2B). It is a plain nn.Linear, so
    a backend's linear swaps and quantization treat it like any other. A quantized checkpoint's
    linears (gptq.QuantizedLinear) fuse into one of those, stacking their integer codes.
    """
    quantized = [isinstance(m, QuantizedLinear) for m in linears]
    if any(quantized):
        if not all(quantized):
            raise ValueError("the checkpoint quantizes some of the linears fused into one (q/k/v or gate/up) "
                             "but not all; quantize all or none of them")
        biases = [m.bias for m in linears]
        like = next((b for b in biases if b is not None), None)
        bias = None if like is None else torch.cat(
            [b if b is not None else like.new_zeros(m.out_features) for b, m in zip(biases, linears)])
        return QuantizedLinear(IntWeight.cat([m.int_weight for m in linears]), bias)
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([
            b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)
        ]), requires_grad=False)
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return TORCH_OPS.add_rms_norm(x, None, self.weight, self.eps)[0]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

        self.qkv_proj = None  # set by fuse_qkv

    def fuse_qkv(self) -> None:
        """One linear for q, k and v (after loading; the checkpoint has them apart).

        Decode pays a fixed cost per linear call; the 2B's k and v projections are only 256 x 1536,
        so one call for the three measured ~100 us less per layer on the CPU (docs/performance.md).
        """
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, attend: Attend, ops=TORCH_OPS):
        n, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = ops.rotary(self.q_proj(x), cos, sin, heads, dim)
            k = ops.rotary(self.k_proj(x), cos, sin, kv_heads, dim)
            v = self.v_proj(x)
        else:  # q and k sit side by side in the output: rotate them in one go (half the small ops)
            qkv = self.qkv_proj(x)  # [N, (Hq + 2 Hkv) * Dh]
            v = qkv[:, (heads + kv_heads) * dim:]
            q, k = ops.rotary(qkv, cos, sin, heads + kv_heads, dim).split([heads, kv_heads], 1)
        return self.o_proj(attend(self.layer, q, k, v.reshape(n, kv_heads, dim)).reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # set by fuse_gate_up

    def fuse_gate_up(self) -> None:
        """One linear for gate and up (after loading). On CUDA a graphed decode step is bound by
        kernel launches as much as by weight reads: one GEMV instead of two per layer. (On the CPU
        our kernel measured no gain from it, so CPU models keep them apart.)"""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x, ops=TORCH_OPS):
        if self.gate_up_proj is None:
            return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, -1)  # views of one output: the kernels read them in place
        return self.down_proj(ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, attend: Attend, ops=TORCH_OPS):
        """x: the last sublayer's output, not yet added to the residual stream (None before the
        first layer, where x is the embeddings) -> (this layer's MLP output, the residual stream)."""
        h, residual = ops.add_rms_norm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        x = self.self_attn(h, cos, sin, attend, ops)
        h, residual = ops.add_rms_norm(x, residual, self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.eps)
        return self.mlp(h, ops), residual


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # on the meta device (from_pretrained) the table is left uninitialised: nn.Embedding's normal_
        # there runs torch's Python refs, whose first call imports torch._dynamo, 2 s of every start-up
        meta = torch.get_default_device().type == "meta"
        shape = (cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape) if meta else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ops = TORCH_OPS  # a backend may swap in its kernels (backends/)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [N, D], positions [3, N] -> final-normed hidden states [N, D]."""
        cfg, ops = self.cfg, self.ops.for_input(x)
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attend, ops)
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]
