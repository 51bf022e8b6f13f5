"""The vision tower: a ViT over native-resolution patches, then a 2x2 PatchMerger.

Input is the processor's `pixel_values` [P, C*tp*p*p] (rows in merge-window order) and `grid_thw`
[n, 3]; output is one LLM-width token per 2x2 window, [P/4, hidden], images in order.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen2vl.attention import block_diagonal_attention
from qwen2vl.config import VisionConfig
from qwen2vl.rotary import apply_rotary, vision_cos_sin


class PatchEmbed(nn.Module):
    """Conv3d with stride == kernel: every patch is one row, so it is a single matmul."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)  # checkpoint: Conv3d weight, flattened

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, cu_seqlens):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each [P, H, D]
        # the reference rotates in float32 and rounds back
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(block_diagonal_attention(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm each patch, concatenate the 4 patches of a 2x2 window, MLP to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
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

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid_thw).cpu()
        cfg = self.cfg
        expected = int(grid_thw.prod(-1).sum())
        assert pixel_values.shape == (expected, cfg.patch_dim), (tuple(pixel_values.shape), expected)
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        # each frame pair of each image/video attends only within itself
        frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_seqlens = [0] + frame_sizes.cumsum(0).tolist()
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.merger(x)
