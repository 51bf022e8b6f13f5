"""Next tokens from a step's logits, each row under its own request's SamplingParams, all rows batched.

Order (as HF's processors): logits processors, penalties (penalties.py), then temperature, top-k,
top-p, min-p, then a draw. Every rule is one tensor op over all the rows that use it; the host
only decides which rows go which way, from their params, never from their values.

Why blocks: on the CPU an argmax, a top-k or a cumsum over the 151,936-token vocabulary costs
several times a plain reduction. So the vocabulary is cut into blocks of BLOCK columns and the
search narrows: the argmax is in the block with the largest maximum; the top k tokens lie in the k
blocks with the largest maxima (the backend's top_k: backends/top_k.py in torch, a C kernel on the
CPU); a draw picks a block by its mass, then a token inside it.

- greedy rows: argmax of the penalised logits.
- rows with top-k: the k best candidates (sorted), then temperature, top-p and min-p on those k.
- other rows: softmax over the vocabulary; top-p finds its floor (the smallest kept probability)
  on a candidate set, sorted, that grows only while the nucleus does not end inside it (a
  near-flat distribution's nucleus is most of the vocabulary); min-p is a floor too.
- the draw is inverse-CDF with two uniforms that are a hash of (seed, step), computed on the host
  with the row's other params: a row's token depends on its logits, its seed and how many tokens
  it has made, never on the rest of the batch, and no generator object is kept per request. The
  one host sync is the `.tolist()` the engine needs anyway (plus one per growth of a top-p
  candidate set); the rest could be captured in a graph, the params read from a static buffer.
Logprobs are of the raw model distribution (before penalties and temperature), as vLLM reports.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.top_k import BLOCK, block_rows, blocks
from qwen2vl.backends.top_k import top_k as block_top_k
from qwen2vl.engine.outputs import TokenLogprob
from qwen2vl.engine.penalties import Penalties
from qwen2vl.engine.sequence import Sequence

TOP_P_CANDIDATES = 256  # first candidate set for top-p without top-k; x8 while the nucleus is larger


class Sampler:
    def __init__(self, device: torch.device, top_k=block_top_k):
        """`top_k(x, k)`: x.topk(k) of float32 logits, the backend's (a CPU kernel where built)."""
        self.device = device
        self.top_k = top_k
        self.penalties = Penalties(device)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] float32 (overwritten), one row per sequence -> B token ids and logprob entries."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs)
        wants_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = torch.log_softmax(_rows(logits, wants_lp), dim=-1) if wants_lp else None
        for i, seq in enumerate(seqs):  # per-request processors (grammar masks, logit bias)
            for process in seq.params.logits_processors:
                logits[i] = process(seq.completion_token_ids, logits[i])
        self.penalties.apply(logits, seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy, top_k, full = [], [], []
        for i, s in enumerate(seqs):
            p = s.params
            (greedy if p.greedy else top_k if 0 < p.top_k < logits.shape[1] else full).append(i)
        if greedy:
            _put(tokens, greedy, argmax(_rows(logits, greedy)))
        for rows, draw in ((top_k, _draw_top_k), (full, _draw_full)):
            if rows:  # the host passes what it knows (k, which rows truncate) so the device never waits
                ps = [seqs[i].params for i in rows]
                params, u = self._row_params([seqs[i] for i in rows])
                _put(tokens, rows, draw(_rows(logits, rows), params, u, ps, self.top_k))
        token_list = tokens.tolist()
        self.penalties.update(seqs, token_list)
        entries: list[TokenLogprob | None] = [None] * len(seqs)
        if wants_lp:
            k = max(seqs[i].params.logprobs for i in wants_lp)
            chosen = raw.gather(1, _rows(tokens, wants_lp)[:, None]).squeeze(1).tolist()
            values, ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
            values, ids = values.tolist(), ids.tolist()
            for j, i in enumerate(wants_lp):
                n = seqs[i].params.logprobs
                entries[i] = TokenLogprob(token_list[i], chosen[j], list(zip(ids[j][:n], values[j][:n])))
        return token_list, entries

    def _row_params(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """[R, 4] float32 (temperature, top_k, top_p, min_p) and uniforms [R, 2], in one copy."""
        host = torch.tensor([(s.params.temperature, s.params.top_k, s.params.top_p, s.params.min_p,
                              *uniforms(s.seed, s.num_completion_tokens)) for s in seqs], dtype=torch.float32)
        host = host.to(self.device, non_blocking=True)
        return host[:, :4], host[:, 4:]


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (first index on ties): the block with the largest maximum, then inside it."""
    cut = blocks(x, float("-inf"))  # [R, nb, BLOCK]
    b = cut.amax(-1).argmax(-1)
    return b * BLOCK + block_rows(cut, b).argmax(-1)


def _draw_top_k(x: torch.Tensor, params: torch.Tensor, u: torch.Tensor, ps: list, top_k) -> torch.Tensor:
    """Rows with top-k: temperature, top-p and min-p on the k best, then a draw among them."""
    temperature, k_row, top_p, min_p = params.unbind(1)
    values, columns = top_k(x, max(p.top_k for p in ps))
    values = values / temperature[:, None]
    values.masked_fill_(torch.arange(values.shape[1], device=x.device) >= k_row[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the better tokens
    top_p = torch.where(top_p < 1, top_p, 2.0)  # 1 = off, whatever the rounding of the cumsum
    probs.masked_fill_((before >= top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1]), 0.0)
    return columns.gather(1, pick(probs, u[:, 0])[:, None]).squeeze(1)


def _draw_full(x: torch.Tensor, params: torch.Tensor, u: torch.Tensor, ps: list, top_k) -> torch.Tensor:
    """Rows without top-k: softmax over the vocabulary, top-p and min-p floors, a block then a token."""
    temperature, _, top_p, min_p = params.unbind(1)
    # in place: a fresh [R, V] tensor costs more than the softmax (page faults on 78 MB at R = 128)
    w = torch.ops.aten._softmax.out(x.div_(temperature[:, None]), -1, False, out=x)  # [R, V]
    nucleus = [i for i, p in enumerate(ps) if p.top_p < 1]
    if nucleus or any(p.min_p for p in ps):
        floor = min_p * w.amax(-1)
        if nucleus:
            nucleus_floor = top_p_floor(_rows(w, nucleus), _rows(top_p, nucleus), top_k)
            _put(floor, nucleus, torch.maximum(_rows(floor, nucleus), nucleus_floor))
        w.masked_fill_(w < floor[:, None], 0.0)
    cut = blocks(w, 0.0)
    b = pick(cut.sum(-1), u[:, 0])
    return b * BLOCK + pick(block_rows(cut, b), u[:, 1])


def top_p_floor(w: torch.Tensor, top_p: torch.Tensor, top_k=block_top_k) -> torch.Tensor:
    """The smallest probability top-p (< 1) keeps, per row of probabilities w [R, V].

    A token stays while the mass of the better ones is below top_p. The search sorts only the best
    n candidates; a row whose nucleus reaches past them is searched again with 8n."""
    n, vocab = TOP_P_CANDIDATES, w.shape[1]
    while True:
        values = top_k(w, min(n, vocab))[0]
        before = values.cumsum(-1) - values
        kept = (before < top_p[:, None]).sum(-1)  # >= 1: the best token always stays
        if n >= vocab or bool((kept < n).all()):
            return values.gather(1, (kept - 1)[:, None]).squeeze(1)
        n *= 8


def pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row of weights [R, n] (>= 0, not all 0), the first index whose cumulative
    weight passes u [R] of the total. u <= 1 - 2**-23 keeps u * total below the total after rounding,
    so the index always holds a positive weight."""
    c = weights.cumsum(-1)
    return torch.searchsorted(c, u[:, None] * c[:, -1:], right=True).squeeze(1)


def uniforms(seed: int, step: int) -> tuple[float, float]:
    """Two floats in [0, 1 - 2**-23] that are a hash of (seed, step): counter-based noise, computed on
    the host with the rest of a row's params (a few microseconds a row)."""
    h = _splitmix64(seed ^ _splitmix64(step))
    return (h >> 41) * 2.0**-23, ((h >> 9) & (2**23 - 1)) * 2.0**-23  # 23 bits each: exact in float32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_M64 = 2**64 - 1


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _put(tokens: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    if len(rows) == len(tokens):
        tokens.copy_(values)
    else:
        tokens.index_copy_(0, torch.tensor(rows, device=tokens.device), values)
