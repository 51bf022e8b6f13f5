"""The model's text and tool-call deltas -> Responses output items, and the stream's events.

One path for both answers: a streamed response sends the events as they come, a whole one keeps
only the items. Items are sequential, as OpenAI sends them: a new item closes the open one.

    response.output_item.added    {"type": "message", "content": [], "status": "in_progress"}
    response.content_part.added   {"type": "output_text", "text": ""}
    response.output_text.delta    ... one per engine increment
    response.output_text.done     the whole text
    response.content_part.done
    response.output_item.done     the finished message
    response.output_item.added    {"type": "function_call", "call_id", "name", "arguments": ""}
    response.function_call_arguments.delta  ... the arguments as they are generated (tool_parse.py)
    response.function_call_arguments.done
    response.output_item.done

`response.created`/`in_progress` before and `response.completed`/`incomplete` after are the
caller's (responses.py). Every event has a `sequence_number`, counting from 0.
"""

import copy

from qwen2vl.server.responses_protocol import item_id


class OutputBuilder:
    """`lazy`: tools were offered, so a message opens only at the first text that is not
    whitespace (the model writes newlines around its calls); otherwise it opens at once, so even
    an empty answer is one message."""

    def __init__(self, lazy: bool):
        self.lazy = lazy
        self.output: list[dict] = []  # the items, the last one maybe still open
        self.open: dict | None = None
        self.pending = ""  # whitespace held back until a message opens (lazy only)
        self.events: list[dict] = []  # not yet sent; the caller takes them
        self.sequence = 0

    def event(self, kind: str, **fields) -> dict:
        out = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        self.events.append(out)
        return out

    def take(self) -> list[dict]:
        out, self.events = self.events, []
        return out

    def start(self) -> None:
        if not self.lazy:
            self._open_message()

    def text(self, text: str) -> None:
        if not text:
            return
        if self.open is None or self.open["type"] != "message":
            if self.lazy and not (self.pending + text).strip():
                self.pending += text
                return
            text, self.pending = self.pending + text, ""
            self._close("completed")
            self._open_message()
        self.open["content"][0]["text"] += text
        self.event("response.output_text.delta", item_id=self.open["id"], output_index=len(self.output) - 1,
                   content_index=0, delta=text, logprobs=[])

    def call(self, delta: dict) -> None:
        """One tool_parse.ToolCallStream delta: a call's head (with its id) or a piece of its arguments."""
        if "id" in delta:
            self.pending = ""  # newlines before a call are not an answer of their own
            self._close("completed")
            self._add({"id": item_id("fc"), "type": "function_call", "status": "in_progress", "call_id": delta["id"],
                       "name": delta["function"]["name"], "arguments": ""})
        piece = delta["function"].get("arguments", "")
        if piece:
            self.open["arguments"] += piece
            self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                       output_index=len(self.output) - 1, delta=piece)

    def finish(self, status: str) -> list[dict]:
        """Close the open item (`status`: completed or incomplete); the output items."""
        if not self.output:
            self._open_message()
        self._close(status)
        return self.output

    def _open_message(self) -> None:
        self._add({"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                   "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.open["content"].append(part)
        self.event("response.content_part.added", item_id=self.open["id"], output_index=len(self.output) - 1,
                   content_index=0, part=copy.deepcopy(part))

    def _add(self, item: dict) -> None:
        self.output.append(item)
        self.open = item
        self.event("response.output_item.added", output_index=len(self.output) - 1, item=copy.deepcopy(item))

    def _close(self, status: str) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        item["status"] = status
        at = {"item_id": item["id"], "output_index": len(self.output) - 1}
        if item["type"] == "message":
            part = item["content"][0]
            self.event("response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[])
            self.event("response.content_part.done", **at, content_index=0, part=copy.deepcopy(part))
        else:
            self.event("response.function_call_arguments.done", **at, name=item["name"], arguments=item["arguments"])
        self.event("response.output_item.done", output_index=at["output_index"], item=copy.deepcopy(item))
