"""The training forward: a packed Batch -> the summed cross-entropy of its trained tokens.

It runs the inference model's own pieces (Qwen2VL.encode_vision, embed, the decoder, lm_head), which
are plain torch and differentiable as they are; only the attention is new: causal within each packed
sequence, none across. Logits are computed only where a token is predicted (a vocabulary-wide row
for every token would be most of the memory of a long batch).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwen2vl.attention import packed_causal_attend
from qwen2vl.train.batch import Batch
from qwen2vl.train.examples import IGNORE


def loss_sum(model, batch: Batch, attend=None) -> torch.Tensor:
    """Sum over the batch's trained tokens of -log p(token) (float32 scalar). `attend` (default: causal within
    each packed sequence) lets a lesson look at the attention as it is computed (qwen2vl/demo/box_attention.py)."""
    device = model.device
    ids = batch.input_ids.to(device)
    vision = model.encode_vision(ids, batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos,
                                 batch.video_grid_thw)
    x = model.embed(ids, vision)  # [N, D]
    hidden = model.model(x, batch.positions.to(device), attend or packed_causal_attend(batch.cu_seqlens))
    targets = batch.targets.to(device)
    keep = targets != IGNORE
    logits = model.compute_logits(hidden[keep])  # [T, vocab] float32
    return F.cross_entropy(logits, targets[keep], reduction="sum")


def checkpoint_layers(layers) -> None:
    """Gradient checkpointing: each layer keeps only its input and recomputes its activations in the
    backward pass. Done by wrapping each instance's forward, so module names (and state_dict keys)
    stay the checkpoint's; dropout masks are replayed (checkpoint restores the RNG state)."""
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
