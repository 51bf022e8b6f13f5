"""What the engine hands back: finished outputs, streamed increments, and stats for metrics.

A request with n > 1 has n completions; `RequestOutput.text` / `.token_ids` / `.finish_reason` read
the first one so the common n = 1 case stays short (`outs[0].text`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # of the sampled token under the raw model distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop token or stop string), "length", "abort"
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    usage: Usage

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs


@dataclass
class Delta:
    """One step's increment of one completion of a request."""

    request_id: str
    index: int  # which of the n completions
    text: str  # new text (held back while it could still become a stop string)
    token_ids: list[int]  # new token ids
    finish_reason: str | None = None  # set on the last delta of this completion
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None  # set on the request's last delta (all n completions done)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextChunk(str):
    """What `LLM.stream` yields: the new text as a plain str, so `"".join(llm.stream(...))` is the
    completion, with the step's token ids and finish reason attached for callers that want them."""

    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None

    def __new__(cls, delta: Delta):
        chunk = super().__new__(cls, delta.text)
        chunk.token_ids = delta.token_ids
        chunk.finish_reason = delta.finish_reason
        chunk.usage = delta.usage
        return chunk

    @property
    def text(self) -> str:
        return str(self)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_blocks: int
    num_free_blocks: int
    block_size: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    vision_cache_hits: int
    vision_cache_misses: int
    num_preemptions: int

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0
