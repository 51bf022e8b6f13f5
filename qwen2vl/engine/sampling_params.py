"""How one request is sampled and when it stops, checked once at the edge.

Field names and meanings follow vLLM / the OpenAI API so callers can pass them through. Every bad
value raises ValueError naming the field and its limit; inside the engine the values are trusted.
`generation_defaults(folder)` reads a checkpoint's generation_config.json into the same fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20


@dataclass
class SamplingParams:
    n: int = 1  # completions per request; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF rule, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI rule, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # per request: the same seed gives the same tokens whatever the batch
    max_tokens: int | None = None  # None = until the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = off; k = the sampled token's logprob plus the top k
    skip_special_tokens: bool = True
    # callables (generated ids so far, logits row [V]) -> logits row [V], applied in order before the
    # penalties; e.g. the server's grammar mask for JSON output or logit_bias
    logits_processors: list = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(self.n, int, "n", lambda v: v >= 1, ">= 1")
        _check(self.temperature, float, "temperature", lambda v: 0 <= v <= 100, "in [0, 100]")
        _check(self.top_p, float, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        _check(self.top_k, int, "top_k", lambda v: v >= 0, ">= 0 (0 or -1 turns it off)")
        _check(self.min_p, float, "min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        _check(self.repetition_penalty, float, "repetition_penalty", lambda v: 0 < v <= 10, "in (0, 10]")
        _check(self.presence_penalty, float, "presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check(self.frequency_penalty, float, "frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        if self.seed is not None:
            _check(self.seed, int, "seed", lambda v: -(2**63) <= v < 2**64, "a 64-bit integer")
        if self.max_tokens is not None:
            _check(self.max_tokens, int, "max_tokens", lambda v: v >= 1, ">= 1")
        if self.logprobs is not None:
            _check(self.logprobs, int, "logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: every stop string must be a non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            _check(t, int, "stop_token_ids", lambda v: v >= 0, "non-negative token ids")
        self.logits_processors = list(self.logits_processors or [])
        if not all(callable(f) for f in self.logits_processors):
            raise ValueError("logits_processors: every entry must be callable(token_ids, logits) -> logits")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from a mapping, rejecting unknown keys (typos would otherwise be silently ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def _check(value, kind, name: str, ok, limit: str) -> None:
    # bool is an int subclass; a bool where a number is expected is almost surely a mistake
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ValueError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    if not ok(value) or value != value:  # value != value: NaN
        raise ValueError(f"{name} must be {limit}, got {value!r}")


def generation_defaults(folder: str | Path) -> dict:
    """SamplingParams fields from `folder/generation_config.json` (empty when there is none).

    HF semantics: `do_sample: false` means greedy whatever the temperature says; `max_new_tokens`
    becomes max_tokens. Only the fields HF and we share are read.
    """
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    g = json.loads(path.read_text())
    out = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if g.get(key) is not None:
            out[key] = g[key]
    if g.get("max_new_tokens") is not None:
        out["max_tokens"] = g["max_new_tokens"]
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def generation_eos_ids(folder: str | Path) -> list[int]:
    """The eos ids generation_config.json lists (HF generate stops on any of them)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
