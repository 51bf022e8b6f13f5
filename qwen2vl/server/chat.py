"""POST /v1/chat/completions: checked request -> prompt + sampling params -> engine -> response or SSE.

    prepare():  inputs.py checks (no I/O) -> fetch media + read headers (thread) -> context check
                -> tools rendered into messages -> processor (decode, tokenize; thread) -> Prompt
    complete(): run to the end, one JSON response (n choices, usage, tool calls parsed)
    stream():   SSE chunks as tokens arrive, tool-call arguments streamed as generated (tool_parse.py),
                grounding on each choice's last chunk, usage last, [DONE]

Whatever the client sent wrong is a 400 before the engine sees the request. Leaving early (client
disconnect, a cancelled stream) aborts the request in the engine, which frees its cache blocks.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial

from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.grounding import parse_grounding
from qwen2vl.processing.media import MediaError
from qwen2vl.server import inputs as chat_inputs
from qwen2vl.server.errors import APIError, bad_request
from qwen2vl.server.protocol import ChatCompletionRequest, chat_response, chunk, completion_id, logprobs_dict
from qwen2vl.server.tool_parse import ToolCallStream, parse_tool_calls
from qwen2vl.server.tools import render_messages, tool_grammar
from qwen2vl.server.truncation import HINT, fit


@dataclass
class Prepared:
    prompt: Prompt
    params: SamplingParams
    parse_tools: bool  # tools were offered: look for <tool_call> blocks in the answer
    visual_tokens: int
    image_size: tuple[int, int] | None = None  # (width, height) of the last image: grounding boxes scale to it
    lora: str | None = None  # the LoRA adapter the request named as its model (None: the base model)
    truncation: dict | None = None  # with "truncation": "auto": what was dropped (truncation.Truncation)


class ChatService:
    def __init__(self, engine, processor, model_config, limits, metrics, compiler, defaults: dict, model_name: str,
                 max_model_len: int):
        self.engine = engine  # AsyncLLM or ReplicaPool
        self.max_model_len = max_model_len
        self.processor = processor  # built with the server's MediaPolicy
        self.model_config = model_config
        self.limits = limits
        self.metrics = metrics
        self.compiler = compiler  # structured.GrammarCompiler
        self.defaults = defaults  # generation_config.json sampling settings
        self.model_name = model_name
        self.policy = limits.media_policy()

    # -- request -> prompt and params ---------------------------------------------------------

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        cfg = self.processor.vision
        find_special = self.processor.tokenizer.find_special
        inputs = chat_inputs.check_inputs(req.messages, req.mm_processor_kwargs, self.limits, cfg, find_special)
        template = chat_inputs.template_options(req.add_generation_prompt, req.continue_final_message,
                                                req.chat_template_kwargs, find_special)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
        if choice not in (None, "none", "auto") and not tools:
            raise bad_request("tool_choice needs tools", "tool_choice")
        for t in tools or []:
            _check_json_free_of_specials(t, "tools", find_special)
        # before any I/O, so bad values fail fast; in a thread because a grammar takes a while to check
        params = await asyncio.to_thread(self._params, req, tools, choice)
        await asyncio.to_thread(chat_inputs.fetch_media, inputs.media, self.policy, self.limits)
        costs = await asyncio.to_thread(chat_inputs.media_costs, inputs.media, cfg, self.limits)
        offered = tools if choice != "none" else None
        truncation = None
        if req.truncation == "auto":  # drop the oldest turns until it fits, counted without decoding
            count = partial(self._count, offered, template)
            inputs, costs, truncation = await asyncio.to_thread(fit, inputs, costs, count, self.max_model_len,
                                                                params.max_tokens)
        else:
            chat_inputs.check_context(costs, self.max_model_len, HINT)
        messages = render_messages(chat_inputs.qwen_messages(inputs), offered)
        try:
            batch = await asyncio.to_thread(partial(self.processor, messages, reject_special_tokens=True, **template))
            prompt = Prompt.from_inputs(batch, self.model_config)
        except (MediaError, ValueError) as e:
            raise bad_request(chat_inputs.public_message(str(e)), "messages") from None
        visual = sum(c.tokens for c in costs)
        self._check_length(len(prompt), visual, params, "" if truncation else HINT)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(prompt)
        images = [c for c in costs if c.kind == "image"]
        size = (images[-1].width, images[-1].height) if images else None
        lora = req.model if req.model in self.engine.served.lora_names else None
        return Prepared(prompt, params, bool(tools) and choice != "none", visual, size, lora,
                        truncation.to_dict() if truncation else None)

    def _count(self, tools, template: dict, inputs: chat_inputs.ChatInputs, costs) -> int:
        """Prompt tokens of `inputs`: the text with one pad per image/video, plus the visual tokens
        the headers gave (no pixels read)."""
        messages = render_messages(chat_inputs.qwen_messages(inputs), tools)
        try:
            ids = self.processor.encode_text(messages, **template)
        except ValueError as e:
            raise bad_request(chat_inputs.public_message(str(e)), "messages") from None
        return len(ids) - len(costs) + sum(c.tokens for c in costs)

    def _params(self, req: ChatCompletionRequest, tools, choice) -> SamplingParams:
        if req.n > self.limits.max_n:
            raise bad_request(f"n: at most {self.limits.max_n} completions per request (--max-n), got {req.n}", "n")
        stop = req.stop or []
        if len(stop) > self.limits.max_stop:
            raise bad_request(f"stop: at most {self.limits.max_stop} stop strings, got {len(stop)}", "stop")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs: needs logprobs=true", "top_logprobs")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options: only allowed with stream=true", "stream_options")
        fields = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
                  "repetition_penalty": req.repetition_penalty}
        given = {k: v for k, v in fields.items() if v is not None}
        max_tokens = req.max_completion_tokens or req.max_tokens or self.defaults.get("max_tokens")
        processors = []
        grammar, param = self._grammar(req, tools, choice)
        if grammar is not None:
            processors.append(self.compiler.constraint(grammar, param, req.n))
        if req.logit_bias:
            processors.append(_logit_bias(req.logit_bias))
        try:
            return SamplingParams(
                **{**{k: v for k, v in self.defaults.items() if k != "max_tokens"}, **given},
                n=req.n, max_tokens=max_tokens, stop=stop, seed=req.seed,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                logprobs=(req.top_logprobs or 0) if req.logprobs else None, logits_processors=processors,
                skip_special_tokens=req.skip_special_tokens)
        except ValueError as e:
            raise bad_request(str(e), str(e).split(" ", 1)[0]) from None

    def _grammar(self, req, tools, choice) -> tuple[str | None, str]:
        forced = tool_grammar(tools, choice) if tools else None
        if forced is not None:
            return self.compiler.lark_grammar(forced), "tools"
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None, ""
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise bad_request("response_format.json_schema: required when type is json_schema",
                              "response_format.json_schema")
        spec = {"type": fmt.type}
        if fmt.json_schema is not None:
            spec["json_schema"] = {"schema": fmt.json_schema.schema_}
        return self.compiler.json_grammar(spec), "response_format"

    def _check_length(self, prompt_len: int, visual: int, params: SamplingParams, hint: str) -> None:
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"the prompt is {prompt_len} tokens ({visual} of them for images/videos) but the context is {limit} "
                f"tokens (over by {prompt_len - limit + 1}, counting one generated token); shorten the messages"
                + (" or lower mm_processor_kwargs.max_pixels" if visual else "") + hint, "messages")
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise bad_request(
                f"max_tokens: the prompt is {prompt_len} tokens, so at most {limit - prompt_len} more fit in the "
                f"context of {limit}; got max_tokens={params.max_tokens}" + hint, "max_tokens")

    # -- running ------------------------------------------------------------------------------

    async def deltas(self, prepared: Prepared, arrival: float):
        """The engine's increments; leaving early (cancelled, client gone) makes AsyncLLM abort the
        request, which frees its blocks."""
        first = True
        async for delta in self.engine.generate(prepared.prompt, prepared.params, request_id=uuid.uuid4().hex,
                                                lora=prepared.lora):
            if first and delta.token_ids:
                self.metrics.ttft.observe(time.monotonic() - arrival)
                first = False
            self.metrics.generation_tokens += len(delta.token_ids)
            yield delta
        self.metrics.latency.observe(time.monotonic() - arrival)

    async def complete(self, req: ChatCompletionRequest, prepared: Prepared, arrival: float) -> dict:
        n = prepared.params.n
        texts, reasons, lps, usage = [""] * n, [None] * n, [[] for _ in range(n)], None
        ids = [[] for _ in range(n)]
        async for d in self.deltas(prepared, arrival):
            texts[d.index] += d.text
            ids[d.index] += d.token_ids
            reasons[d.index] = d.finish_reason or reasons[d.index]
            lps[d.index] += d.logprobs or []
            usage = d.usage or usage
        self.metrics.prompt_tokens += len(prepared.prompt)
        choices = []
        for i in range(n):
            message = {"role": "assistant", "content": texts[i]}
            reason = _finish_reason(reasons[i])
            if prepared.parse_tools:
                content, calls = parse_tool_calls(texts[i])
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [c.to_openai() for c in calls]}
                    reason = "tool_calls"
            regions = self._grounding(ids[i], prepared.image_size)
            if regions:
                message["grounding"] = regions
            choice = {"index": i, "message": message, "finish_reason": reason, "logprobs": None}
            if req.logprobs:
                choice["logprobs"] = logprobs_dict(lps[i], self.processor.tokenizer.token_bytes)
            choices.append(choice)
        return chat_response(completion_id(), prepared.lora or self.model_name, int(time.time()), choices, usage,
                             prepared.truncation)

    def _grounding(self, token_ids: list[int], image_size: tuple[int, int] | None) -> list[dict]:
        """Boxes/quads the answer names, in the last image's pixels (0-1000 scale without an image).

        Read from the raw tokens, so it works whether or not the text keeps special tokens."""
        raw = self.processor.decode(token_ids, skip_special_tokens=False)
        if "<|box_start|>" not in raw and "<|quad_start|>" not in raw:
            return []
        return [r.to_dict() for r in parse_grounding(raw, *(image_size or ()))]

    async def stream(self, req: ChatCompletionRequest, prepared: Prepared, arrival: float):
        """SSE lines; the caller sends them as text/event-stream."""
        rid, created, model = completion_id(), int(time.time()), prepared.lora or self.model_name
        n = prepared.params.n
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        parsers = [ToolCallStream() if prepared.parse_tools else None for _ in range(n)]

        def event(choices, usage=None, more=None) -> str:
            body = {**chunk(rid, model, created, choices, usage), **(more or {})}
            return f"data: {json.dumps({**body, **extra} if usage is None else body, ensure_ascii=False)}\n\n"

        said = {"truncation": prepared.truncation} if prepared.truncation else None  # on the first chunk
        for i in range(n):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], more=said if i == 0 else None)
        usage, ids = None, [[] for _ in range(n)]
        async for d in self.deltas(prepared, arrival):
            text, calls, parser = d.text, [], parsers[d.index]
            ids[d.index] += d.token_ids
            if parser is not None:
                text, calls = parser.push(d.text)
                if d.finished:
                    more_text, more_calls = parser.finish()
                    text, calls = text + more_text, calls + more_calls
            delta = {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = calls  # OpenAI deltas: a call's head, then pieces of its arguments
            lp = logprobs_dict(d.logprobs, self.processor.tokenizer.token_bytes) if req.logprobs else None
            if delta or (lp and lp["content"]):
                yield event([{"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
            if d.finished:
                reason = "tool_calls" if parser is not None and parser.num_calls else _finish_reason(d.finish_reason)
                regions = self._grounding(ids[d.index], prepared.image_size)
                last = {"grounding": regions} if regions else {}  # as the whole answer's message carries it
                yield event([{"index": d.index, "delta": last, "logprobs": None, "finish_reason": reason}])
            usage = d.usage or usage
        self.metrics.prompt_tokens += len(prepared.prompt)
        if include_usage and usage is not None:
            yield event([], usage)
        yield "data: [DONE]\n\n"


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _check_json_free_of_specials(value, where: str, find_special) -> None:
    text = json.dumps(value, ensure_ascii=False)
    found = find_special(text)
    if found is not None:
        raise APIError(400, f"{where}: contains the special token {found!r}, which is not allowed", param=where)


def _logit_bias(bias: dict[str, float]):
    ids = [int(k) for k in bias]
    values = list(bias.values())

    def apply(_token_ids, logits):
        keep = [(i, v) for i, v in zip(ids, values) if i < logits.shape[-1]]
        if keep:
            idx, val = zip(*keep)
            logits = logits.clone()
            logits[list(idx)] += logits.new_tensor(val)
        return logits

    return apply
