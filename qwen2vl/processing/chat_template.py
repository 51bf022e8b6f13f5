"""Chat templates: find a checkpoint's Jinja template and render it exactly as transformers does.

Where the template comes from (the order transformers' processor uses):
`chat_template.json` (legacy processor file) > `chat_template.jinja` (+ named templates in
`additional_chat_templates/*.jinja`) > the `chat_template` key of `tokenizer_config.json`
(a string, or a list of `{name, template}`). A folder with none gets the built-in
Qwen2-VL-Instruct template (`qwen2vl/templates/qwen2_vl.jinja`).

Rendering mirrors `transformers.utils.chat_template_utils`: a sandboxed, immutable Jinja
environment with `trim_blocks`/`lstrip_blocks`, loop controls, the `tojson` filter (no HTML
escaping, unicode kept), the `raise_exception`/`strftime_now`/`dict`/`namespace` globals, and
the variables `messages, tools, documents, add_generation_prompt` plus the tokenizer's
special tokens (`eos_token`, `pad_token`, ...). Messages reach the template as plain JSON
data: an image object becomes a placeholder string naming its type, like "<PngImageFile>"
(templates only test whether the key is there).

`continue_final_message` leaves the last message open, so the model continues it (a prefilled
start of an answer): as transformers does, a tag is appended to the message's text (its last text
part), the chat is rendered, and everything from the tag on (`<|im_end|>`, a new turn) is cut.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "qwen2_vl.jinja"
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' own, so prompts are equal to the letter


class ChatTemplate:
    def __init__(self, templates: str | dict[str, str], variables: dict | None = None):
        """`templates`: one Jinja source, or named sources (as a checkpoint may ship); `variables`:
        always passed to the template (the tokenizer's special tokens), overridable per call."""
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        if not self.templates:
            raise ValueError("no chat template given")
        env = _environment()
        self._compiled = {name: env.from_string(src) for name, src in self.templates.items()}
        self.variables = dict(variables or {})

    @classmethod
    def from_pretrained(cls, folder: str | Path, variables: dict | None = None) -> "ChatTemplate":
        """The folder's chat template(s), or the built-in Qwen2-VL-Instruct one if it has none."""
        templates = load_chat_templates(folder) or {"default": BUILTIN_TEMPLATE.read_text(encoding="utf-8")}
        return cls(templates, variables)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
               continue_final_message: bool = False, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **variables) -> str:
        """The prompt text. `tools` (JSON schemas) and any extra `variables` (e.g. `add_vision_id`)
        are passed to the template as transformers' `apply_chat_template` passes them;
        `continue_final_message` leaves the last message open (module docstring)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other: one continues "
                             "the last message, the other starts a new assistant turn; set one of them")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise ValueError("documents must be a list of dicts")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        if continue_final_message:
            messages = _tag_final_message(messages)
        text = self._select(tools).render(
            messages=_plain(messages), tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **_plain({**self.variables, **variables}),
        )
        return _cut_at_tag(text) if continue_final_message else text

    def _select(self, tools) -> jinja2.Template:
        if tools is not None and "tool_use" in self._compiled:
            return self._compiled["tool_use"]
        if "default" in self._compiled:
            return self._compiled["default"]
        raise ValueError(f"the checkpoint has several chat templates and none is named 'default': "
                         f"{sorted(self._compiled)}")


def _tag_final_message(messages: list[dict]) -> list[dict]:
    """A copy of `messages` with CONTINUE_TAG after the last message's text (its last text part)."""
    if not messages:
        raise ValueError("continue_final_message needs a message to continue; the conversation is empty")
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + CONTINUE_TAG
    elif isinstance(content, (list, tuple)):
        parts = list(content)
        texts = [i for i, p in enumerate(parts) if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if not texts:
            raise ValueError("continue_final_message: the final message has no text to continue")
        parts[texts[-1]] = {**parts[texts[-1]], "text": parts[texts[-1]]["text"] + CONTINUE_TAG}
        last["content"] = parts
    else:
        raise ValueError("continue_final_message: the final message has no text to continue")
    return [*messages[:-1], last]


def _cut_at_tag(text: str) -> str:
    at = text.rfind(CONTINUE_TAG.strip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template drops the final message's text, so it "
                         "can't be continued")
    if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return text[:at]  # the template kept the message's spacing
    return text[:at].rstrip()  # the template trimmed the message, and with it the tag's trailing space


def load_chat_templates(folder: str | Path) -> dict[str, str]:
    """Named chat templates a checkpoint folder ships ({} if none); see the module docstring."""
    folder = Path(folder)
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        return {"default": _read_json(legacy)["chat_template"]}
    templates = {}
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        templates = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))}
    raw = folder / "chat_template.jinja"
    if raw.is_file():
        templates["default"] = raw.read_text(encoding="utf-8")
    if templates:
        return templates
    config = folder / "tokenizer_config.json"
    found = _read_json(config).get("chat_template") if config.is_file() else None
    if found is None:
        return {}
    if isinstance(found, str):
        return {"default": found}
    if isinstance(found, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in found):
        return {t["name"]: t["template"] for t in found}
    raise ValueError(f"{config}: chat_template must be a string or a list of {{name, template}}")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _plain(value):
    """Rebuild template data from plain JSON types (as transformers does): anything else, like a
    PIL image, becomes an inert placeholder naming its type, so the sandbox never sees it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): rendered as
    its body, so templates that use it still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # Reject dunder/underscore attributes, which could reach CPython internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _Dict:
    # `dict(...)` and `dict.fromkeys(...)` without exposing the type itself.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env
