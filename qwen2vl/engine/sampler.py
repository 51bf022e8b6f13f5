"""Next tokens from a step's logits, each row under its own request's SamplingParams.

Order (as HF's processors): penalties, then temperature, top-k, top-p, min-p, then a draw.
Greedy rows take the argmax of the penalised logits. A sampled row draws with the Gumbel-style
race `argmax(p / E)`, E ~ Exp(1), from its own generator, so a seeded request gets the same tokens
whatever else is in the batch. The only host sync is the final `.tolist()` the engine needs anyway.
Logprobs are of the raw model distribution (before penalties and temperature), as vLLM reports.
"""

from __future__ import annotations

import torch

from qwen2vl.engine.outputs import TokenLogprob
from qwen2vl.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] float32, one row per sequence -> B token ids and B logprob entries (or None)."""
    assert logits.dim() == 2 and logits.shape[0] == len(seqs)
    logprobs = _logprobs_of(logits, seqs)
    for i, seq in enumerate(seqs):  # per-request processors (grammar masks, logit bias)
        for process in seq.params.logits_processors:
            logits[i] = process(seq.completion_token_ids, logits[i])
    logits = apply_penalties(logits, seqs)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if rows:
        probs = warp([seqs[i].params for i in rows], logits[rows])
        for probs_row, i in zip(probs, rows):
            race = torch.empty_like(probs_row).exponential_(generator=seqs[i].generator)
            tokens[i] = probs_row.div_(race).argmax()
    token_list = tokens.tolist()
    if logprobs is None:
        return token_list, [None] * len(seqs)
    return token_list, [_entry(lp, s.params.logprobs, t) for lp, s, t in zip(logprobs, seqs, token_list)]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF: divide positive logits, multiply negative
    ones); presence / frequency penalties over output tokens only (OpenAI)."""
    vocab = logits.shape[1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.token_ids, device=logits.device).unique()
            seen = seen[seen < vocab]
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_completion_tokens:
            out = torch.tensor(seq.completion_token_ids, device=logits.device)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp(params: list, logits: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over rows [R, V] -> probabilities [R, V]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=logits.dtype)
    logits = logits / temperature[:, None]
    if all(p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0 for p in params):
        return torch.softmax(logits, dim=-1)
    vocab = logits.shape[1]
    ranked, order = logits.sort(dim=-1, descending=True)
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)
    ranked.masked_fill_(torch.arange(vocab, device=device) >= top_k[:, None], float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=logits.dtype)
    probs = torch.softmax(ranked, dim=-1)
    # drop a token once the mass before it already reaches top_p; the best token always stays
    ranked.masked_fill_(probs.cumsum(dim=-1) - probs > top_p[:, None], float("-inf"))
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
    probs = torch.softmax(ranked, dim=-1)
    ranked.masked_fill_(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return torch.softmax(torch.empty_like(logits).scatter_(1, order, ranked), dim=-1)


def _logprobs_of(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor | None:
    if all(s.params.logprobs is None for s in seqs):
        return None
    return torch.log_softmax(logits, dim=-1)


def _entry(logprobs: torch.Tensor, k: int | None, token: int) -> TokenLogprob | None:
    if k is None:
        return None
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
