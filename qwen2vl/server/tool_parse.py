"""The model's `<tool_call>` blocks back into OpenAI tool calls: whole (`parse_tool_calls`) or as
OpenAI streams them (`ToolCallStream`), the arguments in pieces as they are generated.

A streamed call is, in OpenAI's deltas:

    {"index": 0, "id": "call_...", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    {"index": 0, "function": {"arguments": "{\\"city\\": \\"Pa"}}
    {"index": 0, "function": {"arguments": "ris\\"}"}}

The head goes out once the body reads `{"name": "...", "arguments": {`; from then on the arguments
text goes out as written, less a tail that may not belong to it: the call object's own closing
brace (and whitespace around it) and a partial `</tool_call>`. The pieces joined equal what
`parse_tool_calls` returns for the whole text. A call whose head never showed (another shape,
arguments as a JSON string) goes out whole when its block closes; a block that is no call stays
text, so nothing the model said is lost.
"""

import json
import re
import uuid
from dataclasses import dataclass

from qwen2vl.server.tools import CLOSE, OPEN

# the body of a call, up to where an object of arguments starts
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or new_call_id()

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


def parse_call(body: str) -> ToolCall | None:
    """One `<tool_call>` body -> ToolCall, or None if it is not a {"name", "arguments"} object.
    Object arguments keep the text the model wrote (so a stream's pieces add up to it)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return ToolCall(obj["name"], args)
    head = HEAD.match(body)
    return ToolCall(obj["name"], _arguments_text(body, head.end()) if head and isinstance(args, dict)
                    else json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished answer: the stream's content and its deltas joined."""
    stream = ToolCallStream()
    content, deltas = stream.push(text)
    more_content, more_deltas = stream.finish()
    calls: list[ToolCall] = []
    for d in deltas + more_deltas:
        if "id" in d:
            calls.append(ToolCall(d["function"]["name"], d["function"]["arguments"], d["id"]))
        else:
            calls[-1].arguments += d["function"]["arguments"]
    return (content + more_content).strip(), calls


class ToolCallStream:
    """Streamed text -> (content, tool-call deltas) per push (module docstring). Text that might be
    the start of `<tool_call>` is held back until it is known."""

    def __init__(self):
        self.buffer = ""  # outside a call: a possible start of <tool_call>; inside: the call's body so far
        self.inside = False
        self.num_calls = 0  # calls begun (the index of the next one)
        self.start: int | None = None  # where the open call's arguments start in its body, once its head went out
        self.sent = ""  # the open call's arguments sent so far

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        content, deltas = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    content += self.buffer[: len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return content, deltas
                content += self.buffer[:at]
                self.buffer, self.inside = self.buffer[at + len(OPEN) :], True
            end = self.buffer.find(CLOSE)
            if end < 0:
                return content, deltas + self._grow(self.buffer)
            body, self.buffer = self.buffer[:end], self.buffer[end + len(CLOSE) :]
            more, calls = self._close(body, closed=True)
            content, deltas = content + more, deltas + calls

    def finish(self) -> tuple[str, list[dict]]:
        """What is left when the answer ends (a call the model did not close is closed here)."""
        rest, self.buffer = self.buffer, ""
        if not self.inside:
            return rest, []
        return self._close(rest, closed=False)

    def _grow(self, body: str) -> list[dict]:
        """Deltas for the open call's body so far: its head once known, then new arguments text."""
        out = []
        if self.start is None:
            head = HEAD.match(body)
            if head is None:
                return []
            self.start = head.end()
            call = ToolCall(json.loads(head.group(1)), "")
            out.append(call.to_openai(self.num_calls))
            self.num_calls += 1
        args = body[self.start :]
        args = args[: len(args) - _partial_suffix(args, CLOSE)].rstrip()
        if args.endswith("}"):  # may be the call object's own closing brace: held until more text shows
            args = args[:-1].rstrip()
        if len(args) > len(self.sent) and args.startswith(self.sent):
            out.append({"index": self.num_calls - 1, "function": {"arguments": args[len(self.sent) :]}})
            self.sent = args
        return out

    def _close(self, body: str, closed: bool) -> tuple[str, list[dict]]:
        start, sent = self.start, self.sent
        self.inside, self.start, self.sent = False, None, ""
        if start is None:  # nothing of it went out: the whole call now, or text if it is no call
            call = parse_call(body.strip())
            if call is None:
                return OPEN + body + (CLOSE if closed else ""), []
            self.num_calls += 1
            return "", [call.to_openai(self.num_calls - 1)]
        args = _arguments_text(body, start)
        rest = args[len(sent) :] if args.startswith(sent) else ""
        return "", [{"index": self.num_calls - 1, "function": {"arguments": rest}}] if rest else []


def _arguments_text(body: str, start: int) -> str:
    """The arguments object as written from body[start:]; if it does not parse, the text up to the
    call object's closing brace."""
    try:
        _, end = json.JSONDecoder().raw_decode(body, start)
        return body[start:end]
    except json.JSONDecodeError:
        text = body[start:].rstrip()
        return text[:-1].rstrip() if text.endswith("}") else text


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest end of `text` that is a proper start of `token`."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:n]):
            return n
    return 0
