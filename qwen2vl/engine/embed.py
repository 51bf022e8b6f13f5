"""Embeddings through the engine's model: prefill only, no KV cache.

Prompts are packed into one forward of at most `max_tokens` rows (a longer prompt runs alone),
each attending causally to itself only, and each is pooled from the final hidden states (after
the final norm) into one float32 vector. No cache blocks are taken, so a batch of embeddings runs
between two engine steps without touching the scheduler's state. Pictures come from the engine's
vision cache or its encoder, like a generation prompt's.

    packed rows  [a a a b b c c c c]      cu_seqlens [0, 3, 5, 9]
    attention    a sees a, b sees b, c sees c (causal within each)
    pooled       last: rows 2, 4, 8    mean: mean of each run    first: rows 0, 3, 5
"""

from __future__ import annotations

import torch

from qwen2vl.attention import packed_causal_attend
from qwen2vl.engine.prompt import Prompt

POOLING_MODES = ("last", "mean", "first")


@torch.inference_mode()
def embed_prompts(model, runner, prompts: list[Prompt], mode: str, max_tokens: int) -> torch.Tensor:
    """[B, D] float32: each prompt's final hidden states pooled by `mode` (one of POOLING_MODES)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not supported; supported: {', '.join(POOLING_MODES)}")
    out = []
    for group in _groups(prompts, max_tokens):
        out += _run(model, runner, group, mode)
    return torch.stack(out)


def _groups(prompts: list[Prompt], max_tokens: int) -> list[list[Prompt]]:
    """Consecutive prompts in runs of at most max_tokens tokens (a longer prompt alone)."""
    groups, size = [], 0
    for p in prompts:
        if not groups or size + len(p) > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += len(p)
    return groups


def _run(model, runner, prompts: list[Prompt], mode: str) -> list[torch.Tensor]:
    device = model.device
    lens = [len(p) for p in prompts]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    ids = torch.tensor([t for p in prompts for t in p.token_ids], dtype=torch.long, device=device)  # [N]
    positions = torch.cat([p.positions for p in prompts], dim=1).to(device)  # [3, N]
    lora = getattr(model, "lora", None)
    if lora is not None:  # LoRA linears read a slot per row: the base model's
        lora.set([0] * len(prompts), lens, device)
    x = model.embed(ids, vision_embeds=_vision_rows(runner, prompts))
    hidden = model.model(x, positions, packed_causal_attend(cu))  # [N, D], final-normed
    return [_pool(hidden[a:b], mode).float() for a, b in zip(cu[:-1], cu[1:])]


def _pool(hidden: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "last":
        return hidden[-1]
    if mode == "first":
        return hidden[0]
    return hidden.float().mean(0)


def _vision_rows(runner, prompts: list[Prompt]) -> torch.Tensor | None:
    """Encoder rows for every pad of the packed prompts, in order: cached ones reused, the rest
    encoded in one pass of the vision tower (and cached, as the runner does for generation)."""
    items = [it for p in prompts for it in p.vision]
    if not items:
        return None
    rows, missing = {}, {}
    for it in items:
        if it.content_hash in rows or it.content_hash in missing:
            continue
        cached = runner.vision_cache.get(it.content_hash)
        if cached is None:
            missing[it.content_hash] = it
        else:
            rows[it.content_hash] = cached
    if missing:
        rows.update(runner.encode(list(missing.values())))
    return torch.cat([rows[it.content_hash] for it in items])
