"""Rotary tables: M-RoPE for the text decoder, 2-D axial rope for the vision tower.

Both use the rotate-half convention (the two halves of a head are paired, not interleaved).
Angles are computed in float32 on the fly from positions: no buffers, so casting the model to
bf16 can never round the frequencies.
"""

from __future__ import annotations

import functools

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def inverse_frequencies(dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, mrope_section, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, head_dim] in `dtype` for positions [3, N].

    The head_dim/2 frequencies are cut into sections (e.g. 16, 24, 24): the first section turns
    with the time row, the second with height, the third with width.
    """
    inv_freq, row = _mrope_tables(head_dim, theta, tuple(mrope_section), positions.device)
    pos = positions.float().gather(0, row[:, None].expand(-1, positions.shape[1]))  # [head_dim/2, N]
    freqs = pos.T * inv_freq  # [N, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=16)
def _mrope_tables(head_dim: int, theta: float, mrope_section: tuple[int, ...], device: torch.device):
    """inv_freq [head_dim/2] and row [head_dim/2] (which of t/h/w each frequency reads), built once
    per device: building `row` on every call costs a host->device copy and a host sync
    (repeat_interleave), once per decode step, and a CUDA graph can capture neither."""
    with torch.inference_mode(False):  # plain tensors: usable in and out of inference mode
        inv_freq = inverse_frequencies(head_dim, theta, device)
        row = torch.repeat_interleave(torch.arange(len(mrope_section)), torch.tensor(mrope_section)).to(device)
    return inv_freq, row


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [P, 2] in the order the processor lists patches.

    Patches come in 2x2 merge windows (the four patches of a window are consecutive, windows in
    raster order), repeated for each temporal step of a video.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        hw = torch.stack([hpos, wpos], dim=-1)  # [h, w, 2]
        hw = hw.reshape(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4).reshape(-1, 2)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def vision_cos_sin(grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int, device=None):
    """float32 cos/sin [P, head_dim]: a quarter of the head turns with h, a quarter with w, twice over."""
    hw = vision_patch_positions(grid_thw, merge).to(device)
    inv_freq = inverse_frequencies(head_dim // 2, theta, device)  # [head_dim/4]
    freqs = (hw[:, :, None].float() * inv_freq).flatten(1)  # [P, head_dim/2]: h freqs then w freqs
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
