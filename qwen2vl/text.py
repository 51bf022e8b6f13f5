"""The text decoder: Qwen2 (GQA with q/k/v bias, SwiGLU, RMSNorm) with M-RoPE.

Stateless: `forward(x, positions, attend)` takes packed tokens [N, D] of any number of sequences,
their M-RoPE positions [3, N] and an attention function that knows the sequence boundaries and
any cache (see attention.py). Attribute names equal the checkpoint's, so loading is a name match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.config import TextConfig
from qwen2vl.linear import fuse_linears
from qwen2vl.rotary import apply_rotary, mrope_cos_sin

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32, round to the activation dtype, then scale (the reference's order)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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

    def forward(self, x, cos, sin, attend: Attend):
        n, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = apply_rotary(self.q_proj(x).view(n, heads, dim), cos, sin)
            k = apply_rotary(self.k_proj(x).view(n, kv_heads, dim), cos, sin)
            v = self.v_proj(x)
        else:  # q and k sit side by side in the output: rotate them in one go (half the small ops)
            qk, v = self.qkv_proj(x).split([(heads + kv_heads) * dim, kv_heads * dim], -1)
            q, k = apply_rotary(qk.view(n, heads + kv_heads, dim), cos, sin).split([heads, kv_heads], 1)
        return self.o_proj(attend(self.layer, q, k, v.view(n, kv_heads, dim)).reshape(n, -1))


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

    def forward(self, x):
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attend: Attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """x [N, D], positions [3, N] -> final-normed hidden states [N, D]."""
        cfg = self.cfg
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self.norm(x)
