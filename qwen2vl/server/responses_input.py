"""Responses API input items -> OpenAI chat messages, which then take the chat path's checks.

    {"role": "user", "content": "Hi"}                    -> the same message
    {"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                 {"type": "input_image", "image_url": "data:...", "detail": "low"}]}
                                                         -> text and image_url parts, in place
    {"type": "function_call", "call_id", "name", "arguments"}  -> a tool call on an assistant turn
    {"type": "function_call_output", "call_id", "output"}      -> a tool message

A model's output items (a `message` with `output_text` parts, `function_call`) read as input too,
so a client can send `response.output` back. Parts keep their places and each message remembers
the item it came from (`origins`), so an error the chat path raises about messages[3].content[1]
is reported as input[2].content[1] (`rename`).

An image's `detail` is a pixel budget: "low" caps it at LOW_DETAIL_TOKENS visual tokens
(max_pixels = 256 * 28 * 28 = 200,704 for Qwen2-VL); "high", "auto" and "original" leave the
server's default (the checkpoint's max_pixels under --max-pixels). A `min_pixels`/`max_pixels`
on the item itself wins over `detail`.
"""

import re

from qwen2vl.server.errors import APIError, bad_request

LOW_DETAIL_TOKENS = 256
DETAILS = ("low", "high", "auto", "original")
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
# fields OpenAI's clients send on items that change nothing here (ids, statuses, annotations)
IGNORED = {"id", "status", "phase", "annotations", "logprobs"}


def to_messages(items: list[dict], origins: list[str], factor: int) -> tuple[list[dict], list[str]]:
    """(chat messages, where each came from). `origins[i]` names items[i] in errors; `factor`
    is the image side (pixels) of one visual token."""
    messages, where = [], []
    for item, origin in zip(items, origins):
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, origin, factor)
        elif kind == "function_call":
            _fields(item, {"type", "call_id", "name", "arguments"}, origin)
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise bad_request(f"{origin}.{key}: must be a string", f"{origin}.{key}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # one assistant turn: its text (a message item) and its calls, as the model wrote them
                last.setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif kind == "function_call_output":
            _fields(item, {"type", "call_id", "output"}, origin)
            message = {"role": "tool", "tool_call_id": item.get("call_id"), "content": _output(item, origin)}
        else:
            raise bad_request(f"{origin}.type: unsupported item type {kind!r}; supported: message, function_call, "
                              "function_call_output", f"{origin}.type")
        messages.append(message)
        where.append(origin)
    return messages, where


def _message(item: dict, origin: str, factor: int) -> dict:
    _fields(item, {"type", "role", "content"}, origin)
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise bad_request(f"{origin}.role: must be one of {list(ROLES)}, got {role!r}", f"{origin}.role")
    if isinstance(content, list):
        content = [_part(p, f"{origin}.content[{j}]", factor) for j, p in enumerate(content)]
    return {"role": role, "content": content}


def _part(part, where: str, factor: int):
    if not isinstance(part, dict):
        return part  # the chat path names what is wrong with it
    kind = part.get("type")
    if kind in TEXT_PARTS:
        _fields(part, {"type", "text"}, where)
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal")}
    if kind == "input_image":
        if part.get("image_url") is None:
            raise bad_request(f"{where}.image_url: required (a URL or data URI; file_id is not supported)",
                              f"{where}.image_url")
        detail = part.get("detail", "auto")
        if detail not in DETAILS:
            raise bad_request(f"{where}.detail: must be one of {list(DETAILS)}, got {detail!r}", f"{where}.detail")
        options = {k: v for k, v in part.items() if k not in ("type", "image_url", "detail")}
        if detail == "low" and "max_pixels" not in options:
            options["max_pixels"] = LOW_DETAIL_TOKENS * factor * factor
        return {"type": "image_url", "image_url": {"url": part["image_url"], **options}}
    if kind == "video_url":
        return part  # our video item, as chat completions takes it
    raise bad_request(f"{where}.type: unsupported content type {kind!r}; supported: input_text, input_image, "
                      "video_url (and output_text on assistant messages)", f"{where}.type")


def _output(item: dict, origin: str) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") == "input_text" for p in output):
        return "".join(str(p.get("text", "")) for p in output)
    raise bad_request(f"{origin}.output: must be a string or a list of input_text parts", f"{origin}.output")


def _fields(item: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(item) - allowed - IGNORED)
    if unknown:
        raise bad_request(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}", where)


# -- errors in the request's own names -------------------------------------------------------

_MESSAGE = re.compile(r"messages\[(\d+)\]((?:\.\w+|\[\d+\])*)")
_NAMES = [(re.compile(r"\bmessages\b"), "input"), (re.compile(r"\bmax_tokens\b"), "max_output_tokens"),
          (re.compile(r"response_format\.json_schema\.schema"), "text.format.schema"),
          (re.compile(r"response_format(\.json_schema)?"), "text.format"),
          (re.compile(r"(tools\[\d+\])\.function\b"), r"\1"), (re.compile(r"\.image_url\.url\b"), ".image_url")]
# origins named as a whole: one string (instructions, a string input) or a stored conversation
WHOLE = ("instructions", "input", "previous_response_id")


def rename(err: APIError, origins: list[str]) -> APIError:
    """A chat-path error about messages[k] (and chat's field names) in the Responses request's terms."""

    def one(text: str | None) -> str | None:
        if text is None:
            return None

        def origin(m):
            label = origins[int(m.group(1))] if int(m.group(1)) < len(origins) else "input"
            return label if label in WHOLE else label + m.group(2)

        text = _MESSAGE.sub(origin, text)
        for pattern, name in _NAMES:
            text = pattern.sub(name, text)
        return text

    err.message, err.param = one(err.message), one(err.param)
    return err
