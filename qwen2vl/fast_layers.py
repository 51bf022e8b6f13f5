"""The text decoder's small ops in C kernels on the CPU, swapped in after loading (`speed_up_layers`).

A bf16 decode step of the 2B spends ~5 ms outside its linears: per layer two RMSNorms of 8 torch
ops each, rotary, two residual adds, SiLU * up, two cache writes and SDPA, every op a few
microseconds of dispatch for a few thousand values. `FastTextModel` runs TextModel's forward with
the same modules and weights, calling qwen2vl/kernels/layer_ops.py for those ops:
- each residual add is fused into the RMSNorm after it (the next layer's input norm, or the final norm);
- rotary turns q and k in place in the fused qkv output;
- `F.silu(gate) * up` is one call;
and the engine's runner, seeing a FastTextModel, writes k/v and attends in one call at decode.

The kernels round where torch rounds, so the outputs equal TextModel's bit for bit (attention, a
reduction in another order, agrees to a bf16 rounding; tests/test_layer_ops.py). The model file
never knows: `Qwen2VL` alone keeps the torch code, and load_model applies this on CPU in bf16.
"""

from __future__ import annotations

import torch

from qwen2vl.kernels import layer_ops
from qwen2vl.rotary import mrope_cos_sin
from qwen2vl.text import TextModel


class FastTextModel(torch.nn.Module):
    """TextModel's forward with the small ops fused into C kernels; holds TextModel's own modules
    (same names, so state_dict keys don't change). Needs fused qkv (`Qwen2VL.fuse_qkv`)."""

    def __init__(self, text: TextModel):
        super().__init__()
        self.cfg, self.embed_tokens, self.layers, self.norm = text.cfg, text.embed_tokens, text.layers, text.norm

    @torch.compiler.disable  # ctypes calls: dynamo can't trace them
    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """x [N, D], positions [3, N] -> final-normed hidden states [N, D], as TextModel.forward."""
        if not layer_ops.supports(x):  # another dtype or device: the torch code
            return TextModel.forward(self, x, positions, attend)
        cfg, n = self.cfg, x.shape[0]
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = mrope_cos_sin(positions, dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        residual = None  # the residual stream; x is the latest sublayer output, not yet added to it
        for layer in self.layers:
            attn, mlp, norm1, norm2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
            h, residual = layer_ops.add_rms_norm(x, residual, norm1.weight, norm1.eps)
            qkv = attn.qkv_proj(h)  # [N, (Hq + 2 Hkv) * Dh]
            layer_ops.rotary_(qkv, cos, sin, heads + kv_heads, dim)
            q, k, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], 1)
            x = attn.o_proj(attend(attn.layer, q, k, v).reshape(n, -1))
            h, residual = layer_ops.add_rms_norm(x, residual, norm2.weight, norm2.eps)
            x = mlp.down_proj(layer_ops.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
        return layer_ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]


def speed_up_layers(model) -> bool:
    """Swap model.model (a Qwen2VL's TextModel, q/k/v fused) for a FastTextModel, where the kernels
    can run here and the model is bf16 on the CPU; returns whether it did."""
    cfg = model.config.text
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not layer_ops.available():
        return False
    if not layer_ops.supports_layout(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim):
        return False
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous() for n in norms)
    assert all(layer.self_attn.qkv_proj is not None for layer in model.model.layers), "fuse_qkv first"
    model.model = FastTextModel(model.model)
    return True
