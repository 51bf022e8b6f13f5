"""Sampler and SamplingParams: greedy, seeds, truncation rules, penalties (vs transformers'
logits processors), logprobs, and the errors bad parameters give."""

from __future__ import annotations

import json

import pytest
import torch

from qwen2vl.backends.top_k import top_k
from qwen2vl.engine.penalties import Penalties
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampler import Sampler, argmax, pick, top_p_floor, uniforms
from qwen2vl.engine.sampling_params import SamplingParams, generation_defaults
from qwen2vl.engine.sequence import Sequence, Status

V = 50
CPU = torch.device("cpu")


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=0) -> Sequence:
    p = Prompt(list(prompt), [], torch.zeros(3, len(prompt), dtype=torch.long), 0)
    s = Sequence("r", p, params, 0, seed)
    for t in output:
        s.append_token(t)
    return s


def logits(rows=1, seed=0, vocab=V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_per_row():
    lg = logits(4)
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(4)]
    tokens, lps = Sampler(CPU)(lg.clone(), seqs)
    assert tokens == lg.argmax(-1).tolist() and lps == [None] * 4


@pytest.mark.parametrize("vocab", [50, 128, 151936])
def test_block_argmax_and_top_k_equal_torch(vocab):
    x = logits(6, seed=1, vocab=vocab)
    x[0, :] = 0.0  # a row of ties: the first index wins, as torch's
    x[1, vocab // 3] = x[1, vocab // 2] = 100.0
    assert argmax(x).tolist() == x.argmax(-1).tolist()
    for k in (1, 5, 50):
        values, columns = top_k(x[1:], k)
        want_values, want_columns = x[1:].topk(k)
        torch.testing.assert_close(values, want_values, rtol=0, atol=0)
        assert torch.equal(x[1:].gather(1, columns), values)
        assert columns[1:].tolist() == want_columns[1:].tolist()  # no ties past row 1


def test_top_p_floor_keeps_the_nucleus():
    """Peaked rows end inside the first candidates; near-flat ones make the search grow. The kept set
    is the sorted rule's (a token stays while the mass of the better ones is below top_p, summed in
    float64), and HF's warper agrees up to the boundary token (its float32 cumsum rounds)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    vocab = 151936
    x = torch.cat([logits(2, seed=2, vocab=vocab) * 3, logits(2, seed=3, vocab=vocab) * 0.05])
    w = torch.softmax(x, -1)
    for top_p in (0.3, 0.9):
        kept = w >= top_p_floor(w, torch.full((4,), top_p))[:, None]
        ranked = w.double().sort(-1, descending=True).values
        want = ((ranked.cumsum(-1) - ranked) < top_p).sum(-1)
        assert kept.sum(-1).tolist() == want.tolist()
        hf = TopPLogitsWarper(top_p)(None, x.clone()) > float("-inf")
        assert (hf.sum(-1) - want).abs().max() <= 1 and (kept & ~hf).sum(-1).max() <= 1
        assert want[2:].min() > 2048  # the flat rows really went past the first candidate sets


def test_uniforms_depend_on_seed_and_step_only():
    seeds = [0, 1, 2**64 - 1, 12345]
    u = [uniforms(s, step) for s in seeds for step in (0, 1, 7)]
    assert u == [uniforms(s, step) for s in seeds for step in (0, 1, 7)]
    assert len({x for pair in u for x in pair}) == 2 * len(u)
    many = torch.tensor([uniforms(s, step) for s in range(2000) for step in range(10)])  # [20000, 2]
    assert many.min() >= 0 and many.max() <= 1 - 2.0**-23
    counts = torch.histc(many, bins=10, min=0, max=1) / many.numel()
    torch.testing.assert_close(counts, torch.full((10,), 0.1), atol=0.01, rtol=0)
    assert abs(torch.corrcoef(many.T)[0, 1]) < 0.03  # the two draws of a row are unrelated
    steps = many.view(2000, 10, 2)[:, :, 0]
    assert abs(torch.corrcoef(torch.stack([steps[:, :-1].flatten(), steps[:, 1:].flatten()]))[0, 1]) < 0.03


def test_seed_gives_the_same_tokens_whatever_the_batch():
    row = logits(1, seed=1)
    cases = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.8, top_k=7, top_p=0.9, seed=5),
             SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05, seed=5)]
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.5, top_p=0.5), SamplingParams(repetition_penalty=1.5)]

    def draw(p: SamplingParams, batched: bool) -> list[int]:
        s = make_seq(p, seed=5)
        sampler = Sampler(CPU)
        out = []
        for step in range(20):
            extra = [make_seq(o, seed=i) for i, o in enumerate(others)] if batched else []
            batch = torch.cat([logits(len(extra), seed=9 + step), row]) if extra else row.clone()
            t = sampler(batch, extra + [s])[0][-1]
            s.append_token(t)
            out.append(t)
        return out

    for p in cases:
        alone, batched = draw(p, False), draw(p, True)
        assert alone == batched
        assert len(set(alone)) > 1  # it really samples


def frequencies(params: SamplingParams, lg: torch.Tensor, n: int = 8000) -> torch.Tensor:
    """Token frequencies of n seeded requests drawing once each from the same logits, in one batch."""
    seqs = [make_seq(params, seed=i) for i in range(n)]
    tokens, _ = Sampler(CPU)(lg.expand(n, -1).clone(), seqs)
    return torch.bincount(torch.tensor(tokens), minlength=lg.shape[1]).float() / n


def test_draws_follow_the_softmax_distribution():
    lg = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(frequencies(SamplingParams(temperature=1.0), lg), torch.softmax(lg[0], -1),
                               atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "params",
    [dict(top_k=3), dict(top_p=0.5), dict(top_p=0.95), dict(min_p=0.3), dict(top_k=5, top_p=0.6, min_p=0.1),
     dict(top_k=20, top_p=0.8), dict(top_k=10, min_p=0.2), dict(top_p=0.7, min_p=0.05), dict(temperature=0.5),
     dict(temperature=1.5, top_k=10)],
)
def test_draws_match_transformers_warpers(params):
    """Both paths (top-k candidates, softmax over the vocabulary) against HF's warpers as the oracle:
    never a token outside HF's support, and frequencies within sampling noise of its distribution."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    p = SamplingParams(**{"temperature": 1.0, **params})
    lg = logits(1, seed=3)
    ref = TemperatureLogitsWarper(p.temperature)(None, lg.clone())
    if p.top_k:
        ref = TopKLogitsWarper(p.top_k)(None, ref)
    if p.top_p < 1:
        ref = TopPLogitsWarper(p.top_p)(None, ref)
    if p.min_p:
        ref = MinPLogitsWarper(p.min_p)(None, ref)
    want = torch.softmax(ref, -1)[0]
    got = frequencies(p, lg)
    assert got[want == 0].sum() == 0
    torch.testing.assert_close(got, want, atol=0.025, rtol=0)


def reference_penalties(lg: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Recounted from the whole history: HF's repetition processor, then OpenAI's presence/frequency."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    p = seq.params
    out = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seq.token_ids]), lg.clone())
    counts = torch.bincount(torch.tensor(seq.completion_token_ids, dtype=torch.long), minlength=lg.shape[1])
    return out - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0)).float()


def test_penalties_kept_incrementally_match_a_recount():
    """Several steps, rows joining and leaving: the tables must equal a recount from the history, and a
    row handed to a new sequence must not keep the old one's tokens."""
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.8, presence_penalty=0.5),
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(temperature=0),
              SamplingParams(frequency_penalty=-0.5)]
    seqs = [make_seq(p, prompt=(1, 2, 3, 2), output=(7,) if i == 1 else ()) for i, p in enumerate(params)]
    pen = Penalties(CPU)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        if step == 6:  # one finishes; a new one takes its row
            seqs[0].status = Status.FINISHED
            seqs[0] = make_seq(SamplingParams(frequency_penalty=0.5), prompt=(9,))
        lg = logits(len(seqs), seed=step)
        ours = lg.clone()
        pen.apply(ours, seqs)
        for i, s in enumerate(seqs):
            torch.testing.assert_close(ours[i : i + 1], reference_penalties(lg[i : i + 1], s))
        new = torch.randint(0, 12, (len(seqs),), generator=g).tolist()  # small range: many repeats
        pen.update(seqs, new)
        for s, t in zip(seqs, new):
            s.append_token(t)
    assert len(pen.owner) == 4  # the finished sequence's row was reused


def test_logprobs_are_raw_and_top_k_sorted():
    lg = logits(2, seed=6)
    seqs = [make_seq(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0)),
            make_seq(SamplingParams(temperature=1.0, top_k=5, logprobs=0))]
    tokens, (lp, lp0) = Sampler(CPU)(lg.clone(), seqs)
    raw = torch.log_softmax(lg, -1)
    assert lp.token_id == tokens[0] and lp.logprob == pytest.approx(raw[0, tokens[0]].item())
    values, ids = raw[0].topk(3)
    assert [t for t, _ in lp.top] == ids.tolist()
    assert [v for _, v in lp.top] == pytest.approx(values.tolist())
    assert lp0.top == [] and lp0.logprob == pytest.approx(raw[1, tokens[1]].item())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(max_tokens="5"), "max_tokens"),
        (dict(seed=1.5), "seed"), (dict(temperature=True), "temperature"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_from_dict_rejects_unknown_keys_and_normalizes():
    assert SamplingParams.from_dict({"stop": "END", "top_k": -1}).stop == ["END"]
    assert SamplingParams(top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_generation_config_defaults(tmp_path):
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05,
         "max_new_tokens": 99, "eos_token_id": [1, 2]}))
    d = generation_defaults(tmp_path)
    assert d == {"temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05, "max_tokens": 99}
    assert SamplingParams(**d).greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert generation_defaults(tmp_path)["temperature"] == 0.0


def test_pick_never_lands_on_a_zero_weight():
    """Inverse CDF at the edges: u = 0 skips leading zeros, the largest u stays off trailing zeros."""
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0, 1e-30]])
    for u in ([0.0, 1 - 2.0**-23], [1 / 3, 0.75], [0.5, 0.999999], [1 - 2.0**-23, 0.0]):
        i = pick(w, torch.tensor(u))
        assert (w.gather(1, i[:, None]) > 0).all()
    assert pick(w, torch.tensor([0.0, 1 - 2.0**-23])).tolist() == [1, 0]  # 1e-30 is lost in the float32 sum
    assert pick(w, torch.tensor([0.5, 0.5])).tolist() == [3, 0]
