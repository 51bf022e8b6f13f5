"""Sampler and SamplingParams: greedy, seeds, truncation rules, penalties (vs transformers'
logits processors), logprobs, and the errors bad parameters give."""

from __future__ import annotations

import json

import pytest
import torch

from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampler import apply_penalties, sample, warp
from qwen2vl.engine.sampling_params import SamplingParams, generation_defaults
from qwen2vl.engine.sequence import Sequence

V = 50


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=(), seed=None) -> Sequence:
    p = Prompt(list(prompt), [], torch.zeros(3, len(prompt), dtype=torch.long), 0)
    g = torch.Generator().manual_seed(seed if seed is not None else 0)
    s = Sequence("r", p, params, 0, g)
    for t in output:
        s.append_token(t)
    return s


def logits(rows=1, seed=0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_per_row():
    lg = logits(4)
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(4)]
    tokens, lps = sample(lg.clone(), seqs)
    assert tokens == lg.argmax(-1).tolist() and lps == [None] * 4


def test_seed_gives_the_same_tokens_whatever_the_batch():
    row = logits(1, seed=1)
    p = SamplingParams(temperature=1.0, seed=5)

    def draw(others: int) -> list[int]:
        s = make_seq(p, seed=5)
        out = []
        for _ in range(20):
            batch = torch.cat([logits(others, seed=9), row]) if others else row.clone()
            extra = [make_seq(SamplingParams(temperature=1.0), seed=i) for i in range(others)]
            out.append(sample(batch, extra + [s])[0][-1])
        return out

    alone, batched = draw(0), draw(3)
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_draws_follow_the_softmax_distribution():
    lg = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = make_seq(SamplingParams(temperature=1.0), seed=0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        counts[sample(lg.clone(), [s])[0][0]] += 1
    torch.testing.assert_close(counts / n, torch.softmax(lg[0], -1), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "params",
    [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=5, top_p=0.6, min_p=0.1), dict(temperature=0.5)],
)
def test_truncation_matches_transformers_warpers(params):
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
    torch.testing.assert_close(warp([p], lg.clone()), torch.softmax(ref, -1))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    lg = logits(2, seed=4)
    seqs = [make_seq(SamplingParams(repetition_penalty=1.3), prompt=(1, 2, 3, 2), output=(7, 40)),
            make_seq(SamplingParams(repetition_penalty=0.8), prompt=(5,), output=(5, 6))]
    ours = apply_penalties(lg.clone(), seqs)
    for i, s in enumerate(seqs):
        ref = RepetitionPenaltyLogitsProcessor(s.params.repetition_penalty)(
            torch.tensor([s.token_ids]), lg[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], ref)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    lg = logits(1, seed=5)
    s = make_seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt=(1, 2), output=(3, 3, 4))
    ours = apply_penalties(lg.clone(), [s])[0]
    want = lg[0].clone()
    want[3] -= 0.5 + 2 * 0.25
    want[4] -= 0.5 + 1 * 0.25  # prompt tokens 1 and 2 untouched (OpenAI's rule)
    torch.testing.assert_close(ours, want)


def test_logprobs_are_raw_and_top_k_sorted():
    lg = logits(1, seed=6)
    s = make_seq(SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0))
    (tok,), (lp,) = sample(lg.clone(), [s])
    raw = torch.log_softmax(lg[0], -1)
    assert lp.token_id == tok and lp.logprob == pytest.approx(raw[tok].item())
    values, ids = raw.topk(3)
    assert [t for t, _ in lp.top] == ids.tolist()
    assert [v for _, v in lp.top] == pytest.approx(values.tolist())


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
