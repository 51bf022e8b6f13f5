"""OpenAI function calling on Qwen's tool format: render tools and tool turns, parse calls back.

Qwen2-VL's own chat template knows nothing about tools, so the server writes them into the
conversation as the Qwen2.5 function-calling template does (the "hermes" style the Qwen team
documents): the tool schemas go into the system message, an assistant's calls become

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and `tool` messages become a user turn of `<tool_response>...</tool_response>` blocks. The model
answers in the same form; tool_parse.py turns it back into OpenAI `tool_calls` (whole, or
streamed as the arguments are generated). `tool_choice` "required" or a named function is enforced
with a grammar (`tool_grammar`), so even a weak model produces a well-formed call.
"""

import json

from qwen2vl.server.errors import bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_FORCED_CALLS = 8  # a forced tool_choice grammar allows at most this many calls, so it must end

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_PROMPT = """

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def render_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI messages with tool calls/results -> messages the Qwen chat template can render.
    `tools` (already validated OpenAI tool dicts) go into the system message; None: no tools."""
    out: list[dict] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            text = _text_of(msg.get("content"), f"messages[{i}].content")
            calls = [_render_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(msg["tool_calls"])]
            out.append({"role": "assistant", "content": "\n".join(([text] if text else []) + calls)})
        elif role == "tool":
            block = f"<tool_response>\n{_text_of(msg.get('content'), f'messages[{i}].content')}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block  # consecutive results share one user turn
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({k: v for k, v in msg.items() if k not in ("tool_calls", "tool_call_id", "name")})
    for m in out:
        m.pop("_tool_responses", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if out and out[0].get("role") in ("system", "developer"):
            first = dict(out[0])
            first["content"] = _text_of(first.get("content"), "messages[0].content") + prompt
            out[0] = first
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + prompt})
    return out


def _render_call(call, where: str) -> str:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad_request(f"{where}: a tool call needs a 'function' object with 'name' and 'arguments'", where)
    fn = call["function"]
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{where}.function.name: must be a non-empty string", f"{where}.function.name")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise bad_request(f"{where}.function.arguments: not valid JSON ({e.msg} at char {e.pos})",
                              f"{where}.function.arguments") from None
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def _text_of(content, where: str) -> str:
    """A message's text: a string, or the text parts of a list; images are not allowed here."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}[{j}]: only text parts are allowed in this message", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}: must be a string or a list of text parts", where)


# -- forcing a call --------------------------------------------------------------------------


def tool_grammar(tools: list[dict], choice) -> str | None:
    """A Lark grammar (llguidance dialect) for tool_choice "required" (1..MAX_FORCED_CALLS calls of
    any tool) or {"type": "function", "function": {"name": ...}} (one call of that tool); None
    for "auto"/"none". Arguments must match the tool's JSON schema; no free text around calls."""
    if choice in (None, "auto", "none"):
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        schema, repeat = _call_schema(chosen), ""
    else:
        schema, repeat = _call_schema(tools), f'("\\n" call){{0,{MAX_FORCED_CALLS - 1}}}'
    return (f"start: call {repeat}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(schema)}\n")


def _call_schema(tools: list[dict]) -> dict:
    options = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # compact JSON: unbounded whitespace would let a weak model pad forever
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                     "key_separator": ": "}}
