"""POST /v1/responses: the Responses API on the chat-completions path.

    prepare():  stored conversation (previous_response_id) + instructions + input items
                -> chat messages (responses_input.py) -> a ChatCompletionRequest -> ChatService.prepare,
                so media policy, limits, grammar (text.format, forced tools) and every 400 are chat's,
                reported under this request's names (input[2].content[1], max_output_tokens, text.format)
    complete(): the response object (status incomplete when max_output_tokens cut it)
    stream():   SSE events: response.created, response.in_progress, the items' events
                (responses_stream.py), response.completed (or response.incomplete)

With `store` (the default) the response and its conversation are kept (response_store.py) for a
later `previous_response_id`. As OpenAI's, a stored turn's `instructions` are not carried over.
"""

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError

from qwen2vl.server.chat import ChatService, Prepared
from qwen2vl.server.errors import APIError, bad_request, first_param, format_validation_error
from qwen2vl.server.protocol import ChatCompletionRequest
from qwen2vl.server.response_store import ResponseStore
from qwen2vl.server.responses_input import rename, to_messages
from qwen2vl.server.responses_protocol import ResponsesRequest, response_id, response_object
from qwen2vl.server.responses_stream import OutputBuilder
from qwen2vl.server.tool_parse import ToolCallStream


@dataclass
class Turn:
    req: ResponsesRequest
    prepared: Prepared
    conversation: list[dict]  # the stored turns' items and this request's input, as input items


class ResponsesService:
    def __init__(self, chat: ChatService, store: ResponseStore):
        self.chat = chat
        self.store = store

    async def prepare(self, req: ResponsesRequest) -> Turn:
        history = [] if req.previous_response_id is None else \
            self.store.conversation(req.previous_response_id, "previous_response_id")
        items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
        if not items:
            raise bad_request("input: an empty list; send at least one item", "input")
        origins = ["previous_response_id"] * len(history) + (
            ["input"] if isinstance(req.input, str) else [f"input[{i}]" for i in range(len(items))])
        messages, origins = to_messages(history + items, origins, self.chat.processor.vision.factor)
        if req.instructions is not None:
            messages, origins = [{"role": "system", "content": req.instructions}, *messages], ["instructions", *origins]
        try:
            chat_req = ChatCompletionRequest.model_validate({"messages": messages, **req.chat_fields()})
            prepared = await self.chat.prepare(chat_req)
        except ValidationError as e:
            errors = e.errors(include_url=False)
            raise rename(bad_request(format_validation_error(errors), first_param(errors)), origins) from None
        except APIError as e:
            raise rename(e, origins) from None
        return Turn(req, prepared, history + items)

    async def complete(self, turn: Turn, arrival: float) -> dict:
        async for event in self._events(turn, arrival):
            last = event
        return last["response"]

    async def stream(self, turn: Turn, arrival: float):
        """SSE lines; the caller sends them as text/event-stream."""
        async for event in self._events(turn, arrival):
            yield f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def response(self, rid: str) -> dict:
        return self.store.response(rid)

    async def _events(self, turn: Turn, arrival: float):
        req, prepared = turn.req, turn.prepared
        rid, created = response_id(), int(time.time())
        model = prepared.lora or self.chat.model_name
        out = OutputBuilder(lazy=prepared.parse_tools)
        parser = ToolCallStream() if prepared.parse_tools else None

        def snapshot(status, output, usage=None) -> dict:
            return response_object(rid, created, model, req, prepared.params, status=status, output=output,
                                   usage=usage, truncated=prepared.truncation)

        out.event("response.created", response=snapshot("in_progress", []))
        out.event("response.in_progress", response=snapshot("in_progress", []))
        out.start()
        for event in out.take():
            yield event
        usage, reason = None, None
        async for d in self.chat.deltas(prepared, arrival):
            text, calls = d.text, []
            if parser is not None:
                text, calls = parser.push(d.text)
                if d.finished:
                    more_text, more_calls = parser.finish()
                    text, calls = text + more_text, calls + more_calls
            out.text(text)
            for call in calls:
                out.call(call)
            usage, reason = d.usage or usage, d.finish_reason or reason
            for event in out.take():
                yield event
        self.chat.metrics.prompt_tokens += len(prepared.prompt)
        status = "incomplete" if reason == "length" else "completed"
        response = snapshot(status, out.finish(status), usage)
        if req.store:
            self.store.put(response, turn.conversation + response["output"])
        out.event(f"response.{status}", response=response)
        for event in out.take():
            yield event
