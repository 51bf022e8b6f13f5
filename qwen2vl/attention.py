"""Attention functions the model is given; the modules themselves never hold a cache.

The decoder calls `attend(layer, q, k, v)` with q [N, Hq, D] and k, v [N, Hkv, D] (rotary already
applied) and expects [N, Hq, D] back. `causal_attend` serves one whole sequence with no cache (tests,
tools, `Qwen2VL.logits`); the engine passes its own paged-cache `attend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # [N, H, D] -> [1, H, N, D]: SDPA's fused CPU (flash) kernel takes only 4-D inputs; 3-D ones
    # fall back to the unfused math path, about 2x slower for the vision tower
    return x.transpose(0, 1).unsqueeze(0)


def causal_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), is_causal=True,
                                         enable_gqa=True)  # [1, Hq, N, D]
    return out[0].transpose(0, 1)


def packed_causal_attend(cu_seqlens: list[int]):
    """An `attend` for packed sequences (training batches, embedding batches): causal SDPA on each
    [cu[i], cu[i+1]) run of rows, none across runs."""
    spans = list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    if len(spans) == 1:
        return causal_attend
    masks = {}  # device -> the batch's mask, built by the first layer and kept for the others

    def attend(layer, q, k, v):
        if _one_masked_call(q):
            if q.device not in masks:
                masks[q.device] = block_mask(cu_seqlens, q.device, causal=True)
            return masked_attention(q, k, v, masks[q.device])
        return torch.cat([causal_attend(layer, q[a:b], k[a:b], v[a:b]) for a, b in spans])

    attend.cu_seqlens = list(cu_seqlens)  # what a tensor-parallel rank rebuilds it from (parallel/step.py)
    return attend


def block_diagonal_attention(q, k, v, cu_seqlens: list[int], softmax=torch.softmax,
                             matmul_min: int | None = None) -> torch.Tensor:
    """Non-causal attention within each [cu_seqlens[i], cu_seqlens[i+1]) block, none across.

    q, k, v [N, H, D] -> [N, H, D]. On a GPU, blocks of several lengths go through one masked call
    (masked_attention) while the scores stay under MASKED_SCORES_MAX; otherwise no N x N mask is
    built: a block (an image, one temporal patch pair of a video, one of Qwen2.5-VL's windows) of
    >= `matmul_min` tokens (default CPU_MATMUL_ATTENTION_MIN; 0: none) on the CPU goes through _matmul_attention, whose
    `softmax(scores, -1)` may work in place (the C kernel, backends/cpu/vision_ops.py: the scores are
    its own); the others through SDPA, blocks of one length together as one batch (a 1080p image has
    180 windows of at most four lengths: one call per length instead of one per window, measured
    1.6-2x faster on the CPU).
    """
    if matmul_min is None:
        matmul_min = CPU_MATMUL_ATTENTION_MIN
    elif matmul_min == 0:
        matmul_min = float("inf")
    if q.device.type == "cpu" and len(cu_seqlens) == 2 and cu_seqlens[1] - cu_seqlens[0] >= matmul_min:
        return _matmul_attention(q, k, v, softmax=softmax)  # one image: no copy into `out`
    if _one_masked_call(q) and len(set(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))) > 1:
        return masked_attention(q, k, v, block_mask(cu_seqlens, q.device, causal=False))
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if q.device.type == "cpu" and end - start >= matmul_min:
            out[start:end] = _matmul_attention(q[start:end], k[start:end], v[start:end], softmax=softmax)
        elif end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        if len(starts) == 1:
            rows = slice(starts[0], starts[0] + length)
            qs, ks, vs = (_heads_first(x[rows]) for x in (q, k, v))  # [1, H, L, D]
        else:
            rows = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(q.device)
            qs, ks, vs = (x[rows].unflatten(0, (len(starts), length)).transpose(1, 2) for x in (q, k, v))
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1)
    return out


# Up to this many scores (N x N x heads) a GPU attends to every block in one SDPA call under an N x N
# mask instead of one call per block (or per block length): a training batch of 32 rows is 32 SDPA
# calls per layer otherwise, forward and backward, and the GPU waits on the launches. The bound keeps
# SDPA's unfused fallback, should it take the call, within 4 GB of float32 scores.
MASKED_SCORES_MAX = 1 << 30


def _one_masked_call(q: torch.Tensor) -> bool:
    return q.device.type != "cpu" and q.shape[0] ** 2 * q.shape[1] <= MASKED_SCORES_MAX


def block_mask(cu_seqlens: list[int], device, causal: bool) -> torch.Tensor:
    """[N, N] bool: row i may attend to column j (same block; j <= i too when causal)."""
    lengths = torch.tensor(cu_seqlens, device=device).diff()
    block = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    mask = block[:, None] == block[None, :]
    if causal:
        index = torch.arange(block.numel(), device=device)
        mask &= index[:, None] >= index[None, :]
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of [N, Hq, D] queries over [N, Hkv, D] keys and values under an [N, N] bool mask -> [N, Hq, D].
    K and V are repeated to Hq heads here: SDPA's memory-efficient kernel, the one that takes a mask on
    CUDA, does not take enable_gqa."""
    if k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask)
    return out[0].transpose(0, 1)


# From this many tokens a block on the CPU goes through _matmul_attention: measured (a Zen 5, bf16) 2x faster than
# SDPA's flash kernel from 256 tokens (1024: 15 vs 30 ms a layer, 4096: 0.18 vs 0.47 s), slower at 64.
# Not with AMX: there SDPA's flash kernel runs bf16 on the tiles, 1.5x faster at 1024 (8.6 vs 12.8 ms a
# layer on a 2-vCPU Xeon, benchmarks/attention_cpu.py), and the CPU backend's ops ask for SDPA
# (VisionKernels.matmul_min); nor in float32 on Intel CPUs, where SDPA's flash kernel measured 1.4-2x faster at
# every length (an Ice Lake Xeon, 1024: 26 vs 52 ms a layer; backends/cpu/backend.py)
CPU_MATMUL_ATTENTION_MIN = 256
_SCORES_BUDGET = 1 << 22  # score elements per chunk (8 MB in bf16): the chunk stays in L3


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 4,
                      softmax=torch.softmax) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for [n, H, D] tensors, `heads` heads and a slab of query rows at a time
    (four: a 1024-patch image's scores for four heads fill the budget; 0.72-0.98x the time of two
    in three runs on 2 shared AVX2 cores in float32 (benchmarks/attention_cpu.py), no slower in bf16
    with AVX-512; the same bits either way).

    SDPA's CPU flash kernel runs the vision tower's head_dim 80 at ~20% of GEMM speed; plain
    matmuls with the softmax in between reach ~3x that once the score slab fits in cache. The
    scores are rounded to the input dtype before the softmax (the flash kernel keeps them in
    float32): measured on the 2B vision tower in bf16, both give the same error vs float32
    (relative RMS 1.48e-2).
    """
    n, num_heads, dim = q.shape
    # q scaled in one pass for every head (elementwise: the same bits as slab by slab, without a
    # strided pass per slab), and the output kept head-first: each slab's copy is contiguous and
    # the caller's reshape to [n, H * D] the one transpose (strided copies per slab into an [n, H, D]
    # layout: 1.14-1.35x this one's time, float32, in A/B runs on 2 shared AVX2 cores)
    q = (q * dim**-0.5).transpose(0, 1)  # [H, n, D]
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    out = torch.empty(num_heads, n, dim, dtype=q.dtype, device=q.device)
    rows = max(64, _SCORES_BUDGET // (heads * n))
    for h in range(0, num_heads, heads):
        kt, vh = k[h:h + heads].transpose(1, 2), v[h:h + heads]
        for r in range(0, n, rows):
            scores = torch.matmul(q[h:h + heads, r:r + rows], kt)
            out[h:h + heads, r:r + rows] = softmax(scores, -1) @ vh  # (no matmul out=: training differentiates it)
    return out.transpose(0, 1)
