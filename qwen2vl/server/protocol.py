"""The OpenAI chat-completions request schema, checked at the edge, and the response shapes.

Requests are pydantic models with `extra="forbid"`: a misspelled field is a 400 naming it, not a
silent default. Numeric ranges are OpenAI's. Messages are kept as plain dicts here and checked
item by item in `inputs.py`, where the errors can name the exact content part.
"""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field("response", pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_Strict):
    messages: Annotated[list[dict], Field(min_length=1)]
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted for compatibility, unused
    # extras beyond OpenAI (vLLM's names)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    mm_processor_kwargs: dict | None = None
    skip_special_tokens: bool = True  # false keeps grounding markup (<|box_start|>...) in the text
    # "auto": drop the oldest turns (and their images) until the prompt fits the context (truncation.py)
    truncation: Literal["auto", "disabled"] | None = None
    # chat template options: open the assistant's turn (default: yes, unless continue_final_message),
    # or leave the last message open for the model to continue; variables for the template
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return items

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"keys must be token ids as strings, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"bias for token {k} must be in [-100, 100], got {b}")
        return v


# -- responses -------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_dict(usage) -> dict:
    d = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
         "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if usage.cached_tokens:
        d["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return d


def chat_response(rid: str, model: str, created: int, choices: list[dict], usage, truncation=None) -> dict:
    d = {"id": rid, "object": "chat.completion", "created": created, "model": model,
         "choices": choices, "usage": usage_dict(usage), "system_fingerprint": None}
    if truncation is not None:
        d["truncation"] = truncation
    return d


def chunk(rid: str, model: str, created: int, choices: list[dict], usage=None) -> dict:
    d = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
         "system_fingerprint": None}
    if usage is not None:
        d["usage"] = usage_dict(usage)
    return d


def logprobs_dict(entries, token_bytes) -> dict:
    """Engine TokenLogprob list -> OpenAI `logprobs` ({"content": [...]}) of a choice or chunk;
    `token_bytes(id)` gives a token's raw bytes (a token may hold part of a UTF-8 character)."""

    def one(token_id: int, logprob: float) -> dict:
        raw = token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries or []]}


def model_card(name: str, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "qwen2vl",
            "max_model_len": max_model_len}
