"""Long chats with `"truncation": "auto"`: the oldest turns (and their images) are dropped until the
prompt fits. Through the official `openai` client against a real server on the tiny checkpoint with a
256-token context: without the option the 400 names the sizes and the option; with it the reply
equals a request sent with only the kept messages (greedy), the kept prompt is what the processor
makes of them, the system message and last turn stay, the fewest turns go, a tool call goes with
its results; the impossible case is a 400; streaming says it on the first chunk; a Responses chain
grows past the context."""

import pytest
from openai import BadRequestError, OpenAI

from qwen2vl.processing.processor import Processor
from qwen2vl.server.inputs import ChatInputs, MediaRef
from qwen2vl.server.limits import ServerLimits
from qwen2vl.server.tokens import MediaCost
from qwen2vl.server.truncation import fit, turns
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.media import data_uri, png_bytes
from tests.helpers.server import running_server

KEY = "test-key"
CONTEXT = 256
IMAGE = data_uri(png_bytes(64, 48))
SYSTEM = {"role": "system", "content": "You are terse."}
AUTO = {"truncation": "auto"}


@pytest.fixture(scope="module")
def client():
    with running_server(ServerLimits(), api_key=KEY, max_model_len=CONTEXT) as (url, _app):
        yield OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(tiny_checkpoint())


def long_chat(n_turns: int, last: str = "And finally?") -> list[dict]:
    """system, then n (user, assistant) turns, every other user turn with an image, then a question."""
    messages = [SYSTEM]
    for i in range(n_turns):
        text = f"Turn {i}: " + "tell me more " * 8
        user = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": IMAGE}}] if i % 2 == 0 \
            else text
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": f"Answer {i} " + "ok " * 10}]
    return messages + [{"role": "user", "content": last}]


def chat(client, messages, max_tokens=5, **extra):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra or None)


def prompt_len(processor, messages) -> int:
    return len(processor(messages, add_generation_prompt=True)["input_ids"])


def test_overflow_without_the_option_is_a_400_naming_sizes_and_the_option(client):
    with pytest.raises(BadRequestError) as e:
        chat(client, long_chat(8))
    message = e.value.body["message"]
    assert "the prompt is" in message and f"context is {CONTEXT}" in message and "over by" in message
    assert '"truncation": "auto"' in message
    with pytest.raises(BadRequestError, match='truncation": "auto"'):  # room for max_tokens: the same hint
        chat(client, long_chat(2), max_tokens=CONTEXT - 20)


@pytest.mark.parametrize("max_tokens", [5, 60])
def test_auto_drops_the_fewest_oldest_turns_and_answers_as_the_kept_messages_do(client, processor, max_tokens):
    messages = long_chat(8)
    r = chat(client, messages, max_tokens, **AUTO)
    t = r.model_extra["truncation"]
    n = t["dropped_messages"]
    assert n > 0 and n % 2 == 0  # whole (user, assistant) turns
    kept = [SYSTEM] + messages[1 + n:]
    assert kept[-1] == messages[-1]  # system and the last user message stay
    dropped = messages[1:1 + n]
    assert t["dropped_images"] == sum(isinstance(m["content"], list) for m in dropped) > 0
    assert t["dropped_videos"] == 0
    assert t["prompt_tokens_before"] == prompt_len(processor, messages) > CONTEXT
    assert t["prompt_tokens_after"] == r.usage.prompt_tokens == prompt_len(processor, kept)
    assert r.usage.prompt_tokens + max_tokens <= CONTEXT
    longer = [SYSTEM] + messages[1 + n - 2:]  # one turn fewer dropped would not fit
    assert prompt_len(processor, longer) + max_tokens > CONTEXT
    ref = chat(client, kept, max_tokens)
    assert r.choices[0].message.content == ref.choices[0].message.content
    assert ref.usage.prompt_tokens == r.usage.prompt_tokens and "truncation" not in (ref.model_extra or {})


def test_a_chat_that_fits_drops_nothing(client):
    messages = long_chat(1)
    r = chat(client, messages, **AUTO)
    t = r.model_extra["truncation"]
    assert t["dropped_messages"] == t["dropped_images"] == 0
    assert t["prompt_tokens_before"] == t["prompt_tokens_after"] == r.usage.prompt_tokens
    assert r.choices[0].message.content == chat(client, messages).choices[0].message.content


def test_when_even_the_last_turn_does_not_fit_it_is_a_400_naming_sizes(client):
    messages = long_chat(3, last="why " * 400)
    with pytest.raises(BadRequestError) as e:
        chat(client, messages, **AUTO)
    message = e.value.body["message"]
    assert "last turn alone" in message and f"context is {CONTEXT}" in message and "over by" in message


def test_a_tool_call_goes_with_its_results(client, processor):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "cats"}'}}
    old = [{"role": "user", "content": "Look it up: " + "cats " * 30},
           {"role": "assistant", "content": None, "tool_calls": [call]},
           {"role": "tool", "tool_call_id": "c1", "content": "found " * 30},
           {"role": "assistant", "content": "Cats " * 20}]
    messages = [SYSTEM] + old + long_chat(3)[1:]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, tools=tools,
                                       extra_body=AUTO)
    n = r.model_extra["truncation"]["dropped_messages"]
    assert n >= 4  # the whole tool-call turn, never the call without its result
    ref = client.chat.completions.create(model="tiny", messages=[SYSTEM] + messages[1 + n:], max_tokens=5,
                                         temperature=0, tools=tools)
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    assert r.choices[0].message == ref.choices[0].message


def test_the_responses_api_impossible_case_speaks_its_own_names(client):
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model="tiny", input="why " * 400, instructions="Be terse.", truncation="auto",
                                max_output_tokens=5)
    message = e.value.body["message"]
    assert "last turn alone" in message and "max_output_tokens=5" in message and e.value.body["param"] == "input"


def test_streaming_says_what_was_dropped_on_the_first_chunk(client):
    messages = long_chat(8)
    whole = chat(client, messages, **AUTO)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body=AUTO))
    assert chunks[0].model_extra["truncation"] == whole.model_extra["truncation"]
    assert all("truncation" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_a_responses_chain_grows_past_the_context(client):
    kw = {"model": "tiny", "max_output_tokens": 5, "temperature": 0, "instructions": "You are terse."}
    first = [{"role": "user", "content": [{"type": "input_text", "text": "Turn 0: " + "tell me more " * 8},
                                          {"type": "input_image", "image_url": IMAGE}]}]
    r = client.responses.create(input=first, truncation="auto", **kw)
    assert r.truncation == "auto" and r.model_extra["truncation_details"]["dropped_messages"] == 0
    chat_history = [{"role": "user", "content": [{"type": "text", "text": "Turn 0: " + "tell me more " * 8},
                                                 {"type": "image_url", "image_url": {"url": IMAGE}}]},
                    {"role": "assistant", "content": r.output_text}]
    for i in range(1, 12):
        text = f"Turn {i}: " + "tell me more " * 8
        try:  # without the option, a chain that has outgrown the context is a 400 naming the option
            client.responses.create(input=text, previous_response_id=r.id, **kw)
        except BadRequestError as e:
            assert '"truncation": "auto"' in e.body["message"]
            overflowed = True
        else:
            overflowed = False
        r = client.responses.create(input=text, previous_response_id=r.id, truncation="auto", **kw)
        details = r.model_extra["truncation_details"]
        n = details["dropped_messages"]
        assert (n > 0) == overflowed
        chat_history.append({"role": "user", "content": text})
        kept = [SYSTEM] + chat_history[n:]
        ref = chat(client, kept)
        assert r.output_text == ref.choices[0].message.content
        assert r.usage.input_tokens == ref.usage.prompt_tokens == details["prompt_tokens_after"]
        chat_history.append({"role": "assistant", "content": r.output_text})
        assert details["dropped_images"] == (1 if n else 0)  # the first turn's image went with it
        if n >= 4:
            return
    pytest.fail("the chain never outgrew the context")


def test_a_streamed_response_reports_the_same_truncation(client):
    items = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
              [{"type": "input_text", "text": m["content"][0]["text"]}, {"type": "input_image", "image_url": IMAGE}]}
             for m in long_chat(8)[1:]]
    kw = {"model": "tiny", "input": items, "max_output_tokens": 5, "temperature": 0, "truncation": "auto",
          "instructions": SYSTEM["content"]}
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    done = events[-1].response
    assert done.truncation == "auto" and done.output_text == whole.output_text
    assert done.model_extra["truncation_details"] == whole.model_extra["truncation_details"]
    assert whole.model_extra["truncation_details"]["dropped_images"] > 0


# -- the rule, without a server ----------------------------------------------------------------

def _m(role, **kw):
    return {"role": role, "content": kw.pop("content", "x"), **kw}


@pytest.mark.parametrize("roles, expected", [
    ("s u a u", [[1, 2], [3]]),
    ("s u a T t a u", [[1, 2, 3, 4, 5], [6]]),  # a tool call (T) with its result (t) stays in its turn
    ("u a s u", [[0, 1], [3]]),  # a system message anywhere is not part of a turn
    ("a u a", [[0], [1, 2]]),  # leading messages before the first user message: a turn of their own
    ("s u", [[1]]),
])
def test_turns(roles, expected):
    names = {"s": "system", "u": "user", "a": "assistant", "T": "assistant", "t": "tool"}
    messages = [_m(names[r], **({"tool_calls": [{}]} if r == "T" else {})) for r in roles.split()]
    assert turns(messages) == expected


def test_fit_drops_turns_with_their_media_and_bisects():
    # system 10, then 5 turns of (user 20 with an image of 30, assistant 10), then the last user 20
    messages = [_m("system")] + [_m(r) for _ in range(5) for r in ("user", "assistant")] + [_m("user")]
    media = [MediaRef("image", "", "", {}, 1 + 2 * i, 0) for i in range(5)]
    costs = [MediaCost("image", "", 8, 8, 28, 28, (1, 2, 2), 30) for _ in media]
    calls = []

    def count(inputs, kept_costs):
        calls.append(len(inputs.messages))
        text = sum(10 if m["role"] != "user" else 20 for m in inputs.messages)
        assert [r.message for r in inputs.media] == [i for i, m in enumerate(inputs.messages)
                                                     if m["role"] == "user" and i < len(inputs.messages) - 1]
        return text + sum(c.tokens for c in kept_costs)

    full = count(ChatInputs(messages, media), costs)  # 10 + 5 * 60 + 20 = 330
    kept, kept_costs, t = fit(ChatInputs(messages, media), costs, count, limit=200, max_tokens=10)
    assert full == 330 and t.prompt_tokens_before == 330
    assert t.dropped_messages == 6 and t.dropped_images == 3 and t.prompt_tokens_after == 150
    assert len(kept.messages) == 6 and len(kept_costs) == 2 and kept.messages[0]["role"] == "system"
    assert len(calls) <= 1 + 2 + 3  # the full count, all dropped, then bisection
    with pytest.raises(Exception, match="last turn alone are 30 tokens"):
        fit(ChatInputs(messages, media), costs, count, limit=35, max_tokens=10)
