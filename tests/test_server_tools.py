"""Tool-call rendering and parsing (whole and streamed), and the grammar constraint, without a server."""

import json

import pytest
import torch

from qwen2vl.server.errors import APIError
from qwen2vl.server.structured import GrammarCompiler
from qwen2vl.server.tool_parse import ToolCallStream, parse_tool_calls
from qwen2vl.server.tools import render_messages, tool_grammar
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
PARSE_CASES = [
    ("plain text", "plain text", []),
    (CALL, "", [("f", '{"x": 1}')]),
    ("Let me check.\n" + CALL, "Let me check.", [("f", '{"x": 1}')]),
    (CALL + "\n" + CALL.replace('"f"', '"g"'), "", [("f", '{"x": 1}'), ("g", '{"x": 1}')]),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),  # kept as text
    ('<tool_call>\n{"name": "f", "arguments": {}}', "", [("f", "{}")]),  # stopped before the closing tag
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', "", [("f", '{"a": 2}')]),
    ("a < b and <tool", "a < b and <tool", []),
    ('<tool_call>\n["f"]\n</tool_call>', '<tool_call>\n["f"]\n</tool_call>', []),  # not an object
]


@pytest.mark.parametrize("text,content,calls", PARSE_CASES)
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)


def joined(deltas: list[dict]) -> list[tuple[str, str]]:
    """OpenAI tool-call deltas joined per index, as a client does: (name, arguments)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], ["", ""])
        call[0] += d["function"].get("name", "")
        call[1] += d["function"].get("arguments", "")
    return [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("text,content,calls", PARSE_CASES + [
    ('<tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, "}"]}, "c": "</tool"}}\n</tool_call> ok', "ok",
     [("f", '{"a": {"b": [1, "}"]}, "c": "</tool"}')]),
    ('<tool_call>{"name":"f","arguments":{"x":1} }</tool_call>', "", [("f", '{"x":1}')]),  # as written
])
def test_streamed_parse_equals_whole_at_every_split(text, content, calls):
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)[1]] == calls
    for cut in range(len(text) + 1):
        for step in (1, 3, len(text) or 1):  # the rest in pieces of 1, 3, or at once
            stream = ToolCallStream()
            out, got = stream.push(text[:cut])
            for i in range(cut, len(text), step):
                more, more_calls = stream.push(text[i : i + step])
                out, got = out + more, got + more_calls
            more, more_calls = stream.finish()
            out, got = out + more, got + more_calls
            assert out.strip() == content
            assert joined(got) == calls
            assert all("id" in d and d["id"].startswith("call_") for d in got if "name" in d["function"])


def test_arguments_stream_in_pieces_as_they_are_generated():
    stream = ToolCallStream()
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    pieces = [stream.push(ch)[1] for ch in text] + [stream.finish()[1]]
    head = next(i for i, p in enumerate(pieces) if p)
    assert pieces[head][0] == {"index": 0, "id": pieces[head][0]["id"], "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}
    args = [d["function"]["arguments"] for p in pieces[head:] for d in p if "name" not in d["function"]]
    assert len(args) > 10 and "".join(args) == '{"city": "Paris", "unit": "c"}'
    # each piece goes out as soon as it is known not to be the call's closing brace
    assert "".join(args[:-1]) == '{"city": "Paris", "unit": "c"'


def test_tool_call_content_is_not_emitted_until_known():
    stream = ToolCallStream()
    assert stream.push("Hi <tool") == ("Hi ", [])  # "<tool" could start a call: held back
    assert stream.push("box>") == ("<toolbox>", [])  # it did not


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_render_tools_calls_and_results_in_the_qwen_form():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "rain"}]},
    ]
    out = render_messages(messages, [TOOL])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("You are a helpful assistant.\n\n# Tools\n")
    assert json.dumps(TOOL) in out[0]["content"] and "<tool_call></tool_call> XML tags" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    # an existing system message gets the tools appended; no tools: nothing added
    own = render_messages([{"role": "system", "content": "Be brief."}, messages[0]], [TOOL])
    assert own[0]["content"].startswith("Be brief.\n\n# Tools") and len(own) == 2
    assert render_messages(messages[:1], None) == messages[:1]


def test_render_rejects_bad_history():
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]
    with pytest.raises(APIError, match=r"messages\[0\].tool_calls\[0\].function.arguments"):
        render_messages(bad, None)
    with pytest.raises(APIError, match="only text parts"):
        render_messages([{"role": "tool", "content": [{"type": "image_url", "image_url": "x"}]}], None)


@pytest.fixture(scope="module")
def compiler():
    text = (qwen_tokenizer_dir() / "tokenizer.json").read_text()
    return GrammarCompiler(text, 151936, [151645, 151643])


def encode(compiler, text):
    return compiler.tokenizer.tokenize_str(text)


def allowed(constraint, ids) -> torch.Tensor:
    return torch.isfinite(constraint(ids, torch.zeros(151936)))


def test_named_tool_grammar_accepts_the_call_and_then_only_eos(compiler):
    grammar = compiler.lark_grammar(tool_grammar([TOOL], {"type": "function", "function": {"name": "get_weather"}}))
    c = compiler.constraint(grammar, "tools")
    ids = encode(compiler, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    for i in range(len(ids)):
        assert allowed(c, ids[:i])[ids[i]], compiler.tokenizer.decode_str(ids[: i + 1])
    end = allowed(c, ids)
    assert end.sum() <= 2 and end[151645]  # complete: only end-of-sequence
    wrong = encode(compiler, '<tool_call>\n{"name": "other"')
    assert not all(allowed(c, wrong[:i])[wrong[i]] for i in range(len(wrong)))


def test_json_schema_constraint_follows_each_of_n_paths(compiler):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    grammar = compiler.json_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    c = compiler.constraint(grammar, "response_format", n=2)
    yes, no = encode(compiler, '{"ok": true}'), encode(compiler, '{"ok": false}')
    for i in range(max(len(yes), len(no))):  # interleaved, as the engine calls for two completions
        for ids in (yes, no):
            if i < len(ids):
                assert allowed(c, ids[:i])[ids[i]]
    assert allowed(c, yes)[151645] and allowed(c, no)[151645]
    assert not allowed(c, yes[:-1])[151645]  # an unfinished object can't end
    assert not allowed(c, [])[151645] and allowed(c, [])[encode(compiler, "{")[0]]


@pytest.mark.parametrize("schema,problem", [
    ({"type": "string", "pattern": "(["}, "unclosed character class"),
    ({"$ref": "#/nope"}, "does not exist"),
    ({"type": "strin"}, "Invalid type"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400(compiler, schema, problem):
    with pytest.raises(APIError, match=f"(?s)response_format: the schema cannot be enforced: .*{problem}"):
        compiler.constraint(compiler.json_grammar({"type": "json_schema", "json_schema": {"schema": schema}}),
                            "response_format")
