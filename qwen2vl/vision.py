"""The vision tower: a ViT over native-resolution patches, then a 2x2 PatchMerger.

Input is the processor's `pixel_values` [P, C*tp*p*p] (rows in merge-window order) and `grid_thw`
[n, 3]; output is one LLM-width token per 2x2 window, [P/4, hidden], images in order.

One tower for both families, picked by `cfg.family`: Qwen2-VL's blocks (LayerNorm, fc1/QuickGELU/fc2,
every block attends over whole frames) or Qwen2.5-VL's (RMSNorm, a gated SiLU MLP, window attention
except in `fullatt_block_indexes`; vision_window.py).

The tower computes in the dtype of its norms: the model's dtype, unless a backend keeps the
linears' weights in another (bf16 weights with float32 arithmetic on CPUs without bf16 matmuls:
`compute_in`). QuickGELU / SiLU x up, the 2-D rotary and the attention's softmax come from
`self.ops` (backends/reference.py's torch code unless a backend swapped in its kernels).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen2vl.attention import block_diagonal_attention
from qwen2vl.backends.reference import TORCH_OPS
from qwen2vl.config import VisionConfig
from qwen2vl.rotary import vision_cos_sin
from qwen2vl.text import RMSNorm
from qwen2vl.vision_window import GatedMlp, to_patch_order, window_order


def _norm(cfg: VisionConfig) -> nn.Module:
    return nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps) if cfg.family == "qwen2_vl" else \
        RMSNorm(cfg.embed_dim, cfg.layer_norm_eps)


class PatchEmbed(nn.Module):
    """Conv3d with stride == kernel: every patch is one row, so it is a single matmul."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)  # checkpoint: Conv3d weight, flattened

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, cu_seqlens, ops=TORCH_OPS):
        n, heads = x.shape[0], self.num_heads
        qkv = self.qkv(x)  # [P, 3 * H * D]: q heads, then k heads, then v heads
        dim = qkv.shape[1] // (3 * heads)
        v = qkv[:, 2 * heads * dim:].view(n, heads, dim)
        q, k = ops.vision_rotary(qkv, cos, sin, 2 * heads, dim).split([heads, heads], 1)  # in float32, rounded
        out = block_diagonal_attention(q, k, v, cu_seqlens, softmax=ops.softmax, matmul_min=ops.matmul_min)
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x, ops=TORCH_OPS):
        return self.fc2(ops.quick_gelu(self.fc1(x).contiguous()))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.norm2 = _norm(cfg)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg) if cfg.family == "qwen2_vl" else GatedMlp(cfg)

    def forward(self, x, cos, sin, cu_seqlens, ops=TORCH_OPS):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, ops)
        return x + self.mlp(self.norm2(x), ops)


class PatchMerger(nn.Module):
    """Norm each patch, concatenate the 4 patches of a 2x2 window, MLP to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = _norm(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(self.window_dim, self.window_dim), nn.GELU(), nn.Linear(self.window_dim, cfg.hidden_size)
        )

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.ops = TORCH_OPS  # a backend may swap in its kernels (backends/)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.merger.ln_q.weight.dtype

    def compute_in(self, dtype: torch.dtype) -> None:
        """Run the tower's arithmetic in `dtype` whatever its weights' dtype: its norms are cast,
        the linears must take and give `dtype` (a backend's FastLinears with that compute dtype)."""
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.to(dtype)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid_thw).cpu()
        cfg = self.cfg
        expected = int(grid_thw.prod(-1).sum())
        assert pixel_values.shape == (expected, cfg.patch_dim), (tuple(pixel_values.shape), expected)
        x = self.patch_embed(pixel_values.to(self.compute_dtype))
        ops = self.ops.for_input(x)
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        # each frame pair of each image/video attends only within itself
        frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        spans = [[0] + frame_sizes.cumsum(0).tolist()] * cfg.depth
        if cfg.window_size:  # Qwen2.5-VL: patches regrouped window by window, most blocks within a window
            index, windows = window_order(grid_thw, cfg.spatial_merge_size, cfg.window_tokens)
            order = to_patch_order(index, cfg.spatial_merge_size).to(x.device)
            x, cos, sin = x[order], cos[order], sin[order]
            spans = [spans[0] if i in cfg.fullatt_block_indexes else windows for i in range(cfg.depth)]
        for block, cu_seqlens in zip(self.blocks, spans):
            x = block(x, cos, sin, cu_seqlens, ops)
        x = self.merger(x)
        if cfg.window_size:  # merged tokens back to the processor's order
            x = x[torch.argsort(index).to(x.device)]
        return x
