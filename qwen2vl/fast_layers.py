"""The text decoder's small ops in C kernels on the CPU, swapped in after loading (`speed_up_layers`).

A bf16 decode step of the 2B spends ~5 ms outside its linears: per layer two RMSNorms of 8 torch
ops each, rotary, two residual adds, SiLU * up, two cache writes and SDPA, every op a few
microseconds of dispatch for a few thousand values. `FastTextModel` runs TextModel's forward with
the same modules and weights, calling qwen2vl/backends/cpu/layer_ops.py for those ops:
- each residual add is fused into the RMSNorm after it (the next layer's input norm, or the final norm);
- rotary turns q and k in place in the fused qkv output;
- `F.silu(gate) * up` is one call;
and the engine's runner, seeing a FastTextModel, writes k/v and attends in one call at decode.

The kernels round where torch rounds, so the outputs equal TextModel's bit for bit (attention, a
reduction in another order, agrees to a bf16 rounding; tests/test_layer_ops.py). The model file
never knows: `Qwen2VL` alone keeps the torch code, and load_model applies this in bf16.

On CUDA the same forward runs Triton kernels with the same signatures (backends/cuda/triton_layer_ops.py),
where triton imports and they pass a check against torch at load: ~30 tiny kernels per layer become
5, which is most of a graphed batch-1 decode step's time there.
"""

from __future__ import annotations

import torch

from qwen2vl.backends import ops_for as _ops_for
from qwen2vl.backends.cpu import layer_ops
from qwen2vl.backends.cuda import triton_kernels
from qwen2vl.rotary import mrope_cos_sin
from qwen2vl.text import TextModel


def cuda_layer_ops(device: torch.device):
    """kernels.triton_layer_ops where triton imports and its kernels agree with torch on `device`, else None."""
    return triton_kernels("triton_layer_ops", device)


def ops_for(x: torch.Tensor):
    """The module of layer kernels that takes activations like `x`, or None."""
    return _ops_for(x, layer_ops, "triton_layer_ops")


class FastTextModel(torch.nn.Module):
    """TextModel's forward with the small ops fused into C kernels; holds TextModel's own modules
    (same names, so state_dict keys don't change). Needs fused qkv (`Qwen2VL.fuse_qkv`)."""

    def __init__(self, text: TextModel):
        super().__init__()
        self.cfg, self.embed_tokens, self.layers, self.norm = text.cfg, text.embed_tokens, text.layers, text.norm

    @torch.compiler.disable  # ctypes calls: dynamo can't trace them
    def forward(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """x [N, D], positions [3, N] -> final-normed hidden states [N, D], as TextModel.forward."""
        ops = ops_for(x)
        if ops is None:  # another dtype or device: the torch code
            return TextModel.forward(self, x, positions, attend)
        cfg, n = self.cfg, x.shape[0]
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = mrope_cos_sin(positions, dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        residual = None  # the residual stream; x is the latest sublayer output, not yet added to it
        for layer in self.layers:
            attn, mlp, norm1, norm2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
            h, residual = ops.add_rms_norm(x, residual, norm1.weight, norm1.eps)
            qkv = attn.qkv_proj(h)  # [N, (Hq + 2 Hkv) * Dh]
            ops.rotary_(qkv, cos, sin, heads + kv_heads, dim)
            q, k, v = qkv.view(n, heads + 2 * kv_heads, dim).split([heads, kv_heads, kv_heads], 1)
            x = attn.o_proj(attend(attn.layer, q, k, v).reshape(n, -1))
            h, residual = ops.add_rms_norm(x, residual, norm2.weight, norm2.eps)
            if mlp.gate_up_proj is None:
                x = mlp.down_proj(ops.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
            else:  # fused (CUDA): the kernels read gate and up as views of one output
                gate, up = mlp.gate_up_proj(h).chunk(2, -1)
                x = mlp.down_proj(ops.silu_mul(gate, up))
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]


def speed_up_layers(model) -> bool:
    """Swap model.model (a Qwen2VL's TextModel, q/k/v fused) for a FastTextModel, where the kernels
    can run here and the model is bf16 (on the CPU, or on CUDA with Triton); returns whether it did."""
    cfg = model.config.text
    if model.dtype != torch.bfloat16:
        return False
    if model.device.type == "cpu":
        if not layer_ops.available():
            return False
        if not layer_ops.supports_layout(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim):
            return False
    elif model.device.type != "cuda" or cuda_layer_ops(model.device) is None:
        return False
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    assert all(n.weight.dtype == torch.bfloat16 and n.weight.is_contiguous() for n in norms)
    assert all(layer.self_attn.qkv_proj is not None for layer in model.model.layers), "fuse_qkv first"
    model.model = FastTextModel(model.model)
    return True
