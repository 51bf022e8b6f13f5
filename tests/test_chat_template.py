"""Chat template: found where transformers finds it, rendered exactly as transformers renders it."""

import json
import shutil

import jinja2
import pytest
from PIL import Image

from qwen2vl.processing.chat_template import BUILTIN_TEMPLATE, ChatTemplate, load_chat_templates
from tests.helpers.qwen_tokenizer import OFFICIAL_CHAT_TEMPLATE, qwen_tokenizer_dir

transformers = pytest.importorskip("transformers")

IMG = Image.new("RGB", (32, 32))
CONVERSATIONS = {
    "string": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "images": [{"role": "user", "content": [
        {"type": "image", "image": IMG}, {"type": "text", "text": "Compare"},
        {"type": "image", "image": "b.png"}, {"type": "text", "text": " these."}]}],
    "video_and_image": [{"role": "user", "content": [
        {"type": "video", "video": "v.mp4", "fps": 1.0}, {"type": "image", "image": IMG},
        {"type": "text", "text": "What now?"}]}],
    "multi_turn": [
        {"role": "system", "content": [{"type": "text", "text": "You see images."}]},
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat. 猫。"},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": IMG}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
        {"role": "user", "content": "Thanks 😀"}],
}

# A tool-aware template in the style of Qwen2.5's, exercising tojson, namespace, loop controls.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{%- endif %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{{ ns.n }} turns{{ eos_token }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"name": "get_weather", "description": "天气 <b>&",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.fixture(scope="module")
def ref():
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def ours():
    return ChatTemplate.from_pretrained(qwen_tokenizer_dir(), {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


def test_builtin_template_is_the_official_one(tmp_path):
    assert BUILTIN_TEMPLATE.read_text(encoding="utf-8") == OFFICIAL_CHAT_TEMPLATE
    assert ChatTemplate.from_pretrained(tmp_path).templates == {"default": OFFICIAL_CHAT_TEMPLATE}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_render_matches_transformers(ref, ours, name, add_generation_prompt, add_vision_id):
    msgs = CONVERSATIONS[name]
    expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       add_vision_id=add_vision_id)
    assert ours.render(msgs, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id) == expected


def test_documented_example(ours):
    content = [{"type": "image", "image": IMG}, {"type": "text", "text": "What is in this image?"}]
    msgs = [{"role": "user", "content": content}]
    assert ours.render(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is in this image?<|im_end|>\n<|im_start|>assistant\n")


def test_tools_and_variables_match_transformers(ref):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "weather?"}]
    ours = ChatTemplate(TOOLS_TEMPLATE, {"eos_token": "<|im_end|>"})
    for tools in (None, TOOLS):
        expected = ref.apply_chat_template(msgs, tools=tools, chat_template=TOOLS_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
        assert ours.render(msgs, tools=tools, add_generation_prompt=True) == expected
    assert '"description": "天气 <b>&"' in ours.render(msgs, tools=TOOLS)  # tojson: no HTML escaping


def test_named_templates_pick_tool_use_when_tools_given(tmp_path):
    config = {"chat_template": [{"name": "default", "template": "plain"},
                                {"name": "tool_use", "template": "tools:{{ tools | length }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = ChatTemplate.from_pretrained(tmp_path)
    assert t.render([]) == "plain"
    assert t.render([], tools=TOOLS) == "tools:1"
    with pytest.raises(ValueError, match="none is named 'default'"):
        ChatTemplate({"tool_use": "x"}).render([])


def test_template_file_precedence(tmp_path):
    shutil.copy(qwen_tokenizer_dir() / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    assert load_chat_templates(tmp_path) == {"default": OFFICIAL_CHAT_TEMPLATE}
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools")
    assert load_chat_templates(tmp_path) == {"default": "from jinja", "tool_use": "tools"}
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_chat_templates(tmp_path) == {"default": "from json"}


def test_raise_exception_and_sandbox():
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user') }}").render([])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ messages.append(1) }}").render([])  # immutable
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])


def test_media_objects_reach_the_template_as_placeholders():
    t = ChatTemplate("{% for c in messages[0].content %}{{ c.image }}|{% endfor %}{{ strftime_now('%Y') | length }}")
    msgs = [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "image", "image": "a.png"}]}]
    assert t.render(msgs) == "<Image>|a.png|4"


def test_generation_tags_parse():
    t = ChatTemplate("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}")
    assert t.render([{"role": "assistant", "content": "hi"}]) == "[hi]"


PREFILLS = {
    "string": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}],
    "trailing_space": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "One, two, "}],
    "parts": [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "Say it"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}],
    "empty": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    "user_last": [{"role": "user", "content": "Complete: the quick brown"}],
}
TRIMMING_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}"


@pytest.mark.parametrize("name", PREFILLS)
def test_continue_final_message_matches_transformers(ref, ours, name):
    """The final message is left open (no <|im_end|>, no new turn), as transformers renders it."""
    msgs = PREFILLS[name]
    expected = ref.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    got = ours.render(msgs, continue_final_message=True)
    assert got == expected and not got.endswith("<|im_end|>\n")
    trimmed = ref.apply_chat_template(msgs, tokenize=False, continue_final_message=True,
                                      chat_template=TRIMMING_TEMPLATE)
    assert ChatTemplate(TRIMMING_TEMPLATE).render(msgs, continue_final_message=True) == trimmed


def test_continue_final_message_and_generation_prompt_exclude_each_other(ours):
    with pytest.raises(ValueError, match="continue_final_message.*add_generation_prompt"):
        ours.render(PREFILLS["string"], continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="no text to continue"):
        ours.render([{"role": "user", "content": [{"type": "image", "image": IMG}]}], continue_final_message=True)
    with pytest.raises(ValueError, match="drops the final message"):
        ChatTemplate("{% for m in messages %}{{ m.role }}{% endfor %}").render(PREFILLS["string"],
                                                                              continue_final_message=True)
