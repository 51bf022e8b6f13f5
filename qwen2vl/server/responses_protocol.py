"""The OpenAI Responses request schema, checked at the edge, and the response object's shape.

As protocol.py does for chat completions: pydantic models with `extra="forbid"`, so a misspelled
or unsupported field (`reasoning`, `include`, a hosted tool) is a 400 naming it. Items of `input`
stay plain dicts here and are checked one by one in responses_input.py, where an error can name
input[2].content[1]. The response object carries the fields the official client reads
(openai/types/responses/response.py); `output_text` is not one of them: the client derives it.
"""

import uuid
from typing import Literal

from pydantic import Field, field_validator, model_validator

from qwen2vl.server.protocol import FUNCTION_NAME, _Strict


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", pattern=FUNCTION_NAME)
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("schema: required when type is json_schema")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    input: str | list[dict]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True  # as OpenAI's: kept for previous_response_id and GET /v1/responses/{id}
    previous_response_id: str | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None  # echoed back, unused
    truncation: Literal["auto", "disabled"] | None = None  # "auto": drop the oldest turns to fit (truncation.py)
    user: str | None = None  # accepted for compatibility, unused
    # extras beyond OpenAI (vLLM's names, as chat completions takes them)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    mm_processor_kwargs: dict | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, v):
        """One message for any wrong shape (pydantic would list every branch of the union)."""
        if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, dict) for x in v)):
            return v
        raise ValueError("must be a string or a list of input items (objects)")

    def chat_fields(self) -> dict:
        """The fields of a chat completions request that mean the same here (under chat's names)."""
        body = {"model": self.model, "max_tokens": self.max_output_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls, "seed": self.seed,
                "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "mm_processor_kwargs": self.mm_processor_kwargs, "truncation": self.truncation}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        choice = self.tool_choice
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} \
            if isinstance(choice, NamedFunction) else choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            spec = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        return {k: v for k, v in body.items() if v is not None}


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage_dict(usage) -> dict | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens or 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def response_object(rid: str, created_at: int, model: str, req: ResponsesRequest, params, *, status: str,
                    output: list[dict], usage=None, truncated: dict | None = None) -> dict:
    """The response as OpenAI returns it; `params`: the request's effective SamplingParams;
    `truncated`: what "truncation": "auto" dropped, as `truncation_details` (ours, not OpenAI's)."""
    fmt = req.text.format if req.text and req.text.format else None
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else req.tool_choice
    return {"id": rid, "object": "response", "created_at": created_at, "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice or "auto", "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": req.truncation or "disabled", "usage": usage_dict(usage), "user": req.user,
            **({"truncation_details": truncated} if truncated else {})}
