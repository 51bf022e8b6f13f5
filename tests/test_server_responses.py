"""POST /v1/responses through the official `openai` client against a real server on the tiny
checkpoint: the answer equals chat completions' for the same conversation, images, instructions,
max_output_tokens (incomplete), text.format json_schema, a function-call round trip,
previous_response_id chains and their 404, the streamed events in order (their deltas joined
equal the whole answer), auth and the 400s. One real server for the module."""

import json

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

from qwen2vl.server.errors import APIError, bad_request
from qwen2vl.server.limits import ServerLimits
from qwen2vl.server.response_store import ResponseStore
from qwen2vl.server.responses_input import LOW_DETAIL_TOKENS, rename, to_messages
from tests.helpers.media import data_uri, mp4_bytes, png_bytes
from tests.helpers.server import running_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = data_uri(png_bytes(64, 48))
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    with running_server(ServerLimits(max_stored_responses=50), api_key=KEY) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def create(client, input, **kw):
    return client.responses.create(model="tiny", input=input, **{"max_output_tokens": 6, "temperature": 0, **kw})


def chat(client, messages, max_tokens=6, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                          **kw)


def test_string_input_answers_as_chat_completions_does(client):
    r = create(client, "Describe a cat.", max_output_tokens=7)
    ref = chat(client, [{"role": "user", "content": "Describe a cat."}], max_tokens=7)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert r.output_text == item.content[0].text == ref.choices[0].message.content
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.usage.output_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if ref.choices[0].finish_reason == "length":  # max_output_tokens cut it
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert item.status == "incomplete"
    else:
        assert r.status == "completed" and r.incomplete_details is None
    assert r.temperature == 0 and r.max_output_tokens == 7 and r.store is True


def test_messages_with_an_image_and_instructions(client):
    content = [{"type": "input_text", "text": "What is this?"},
               {"type": "input_image", "image_url": IMAGE, "detail": "high"}]
    r = create(client, [{"role": "user", "content": content}], instructions="Answer briefly.")
    ref = chat(client, [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                     {"type": "image_url", "image_url": {"url": IMAGE}}]}])
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.output_text == ref.choices[0].message.content and r.instructions == "Answer briefly."
    low = create(client, [{"role": "user", "content": content[:1] + [{**content[1], "detail": "low"}]}],
                 instructions="Answer briefly.")
    assert low.usage.input_tokens == r.usage.input_tokens  # the tiny checkpoint's max_pixels is under low's cap


def test_video_item_and_mm_processor_kwargs_as_chat_takes_them(client):
    video = {"type": "video_url", "video_url": {"url": data_uri(mp4_bytes(frames=8), "video/mp4"), "fps": 4}}
    big = data_uri(png_bytes(400, 300, seed=2))
    kwargs = {"mm_processor_kwargs": {"max_pixels": 28 * 28 * 16}}
    r = create(client, [{"role": "user", "content": [video, {"type": "input_image", "image_url": big},
                                                     {"type": "input_text", "text": "What happens?"}]}],
               extra_body=kwargs)
    ref = chat(client, [{"role": "user", "content": [video, {"type": "image_url", "image_url": {"url": big}},
                                                     {"type": "text", "text": "What happens?"}]}], extra_body=kwargs)
    assert r.usage.input_tokens == ref.usage.prompt_tokens and r.output_text == ref.choices[0].message.content


def test_detail_is_a_pixel_budget_and_item_options_win():
    def image(**part):
        messages, _ = to_messages([{"role": "user", "content": [{"type": "input_image", "image_url": "u", **part}]}],
                                  ["input[0]"], factor=28)
        return messages[0]["content"][0]["image_url"]

    assert image(detail="low") == {"url": "u", "max_pixels": LOW_DETAIL_TOKENS * 28 * 28}
    assert image(detail="high") == image(detail="auto") == image() == {"url": "u"}
    assert image(detail="low", max_pixels=784 * 4) == {"url": "u", "max_pixels": 784 * 4}


def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=150)

    r = client.responses.parse(model="tiny", input="Make up a person.", text_format=Person, max_output_tokens=200,
                               extra_body={"seed": 2})
    assert r.status == "completed" and isinstance(r.output_parsed, Person)


def test_output_items_read_back_as_one_assistant_turn_and_errors_name_the_input():
    said = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]}
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    messages, origins = to_messages([said, call, result], ["input[0]", "input[1]", "input[2]"], factor=28)
    assert messages == [{"role": "assistant", "content": [{"type": "text", "text": "Let me look."}],
                         "tool_calls": [{"id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": "{}"}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert origins == ["input[0]", "input[2]"]
    err = rename(bad_request("messages[1].content[0].image_url.url: bad", "messages[1].content[0].image_url.url"),
                 ["instructions", "input[3]"])
    assert (err.message, err.param) == ("input[3].content[0].image_url: bad", "input[3].content[0].image_url")
    err = rename(bad_request("messages[0].content: has <|im_end|>", "messages[0].content"), ["instructions"])
    assert (err.message, err.param) == ("instructions: has <|im_end|>", "instructions")


def test_json_schema_output_parses(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    r = create(client, "Make up a person.", max_output_tokens=200, text=fmt, temperature=1.0, extra_body={"seed": 1})
    assert r.status == "completed", r.output_text  # the grammar ended it
    obj = json.loads(r.output_text)
    assert set(obj) == {"name", "age"} and len(obj["name"]) <= 10 and 0 <= obj["age"] <= 150
    assert r.text.format.type == "json_schema"


def test_function_call_round_trip(client):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    r = create(client, question, tools=[WEATHER], max_output_tokens=100,
               tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city", "unit"}

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    again = create(client, question + [o.model_dump(exclude_none=True) for o in r.output] + [result],
                   tools=[WEATHER])
    assert again.usage.input_tokens > r.usage.input_tokens  # the call and its result are in the prompt
    chained = create(client, [result], tools=[WEATHER], previous_response_id=r.id)
    assert chained.usage.input_tokens == again.usage.input_tokens and chained.output_text == again.output_text


def test_previous_response_id_prepends_the_stored_conversation(client):
    first = create(client, "Name a colour.", instructions="Be brief.")
    second = create(client, "And another?", previous_response_id=first.id)
    ref = chat(client, [{"role": "user", "content": "Name a colour."},  # instructions are not carried over
                        {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And another?"}])
    assert second.usage.input_tokens == ref.usage.prompt_tokens
    assert second.output_text == ref.choices[0].message.content and second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text

    with pytest.raises(NotFoundError, match="resp_nope"):
        create(client, "Hi", previous_response_id="resp_nope")
    unstored = create(client, "Hi", store=False)
    with pytest.raises(NotFoundError, match=unstored.id):
        client.responses.retrieve(unstored.id)


def test_the_store_keeps_the_newest_within_both_caps():
    store = ResponseStore(2, max_bytes=10**6)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}])
    assert len(store) == 2 and store.conversation("resp_2") == [{"role": "user", "content": "2"}]
    with pytest.raises(APIError, match="resp_0") as e:
        store.response("resp_0")
    assert e.value.status == 404
    small = ResponseStore(100, max_bytes=3000)
    for i in range(3):
        small.put({"id": f"resp_{i}"}, [{"role": "user", "content": "x" * 1000}])
    assert len(small) == 2 and small.bytes <= 3000
    small.put({"id": "resp_big"}, [{"role": "user", "content": "x" * 5000}])  # over the cap alone: not kept
    assert len(small) == 0 and small.bytes == 0


def test_stream_events_in_order_and_deltas_equal_the_whole_answer(client):
    whole = create(client, "Tell me a story.", max_output_tokens=12)
    events = list(create(client, "Tell me a story.", max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{whole.status}"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.total_tokens == whole.usage.total_tokens
    assert events[0].response.id == events[-1].response.id and events[0].response.status == "in_progress"


def test_stream_helper_gets_the_final_response(client):
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    with client.responses.stream(model="tiny", input="Make up a person.", text=fmt, max_output_tokens=200,
                                 temperature=1.0, extra_body={"seed": 3}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and "".join(deltas) == final.output_text
    assert set(json.loads(final.output_text)) == {"name", "age"}


def test_function_call_arguments_stream(client):
    events = list(create(client, "Weather?", tools=[WEATHER], tool_choice="required", max_output_tokens=300,
                         stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added and all(i.type == "function_call" and i.arguments == "" for i in added)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(pieces) > 3 and "".join(pieces) == "".join(d.arguments for d in done)
    final = events[-1].response.output
    assert [o.arguments for o in final] == [d.arguments for d in done]
    assert all(set(json.loads(d.arguments)) == {"city", "unit"} for d in done)
    stored = client.responses.retrieve(events[-1].response.id)  # a stream's response is stored when it ends
    assert [(o.call_id, o.arguments) for o in stored.output] == [(o.call_id, o.arguments) for o in final]


def test_auth_and_metrics(server, client):
    bad = OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.responses.create(model="tiny", input="Hi")
    stored = create(client, "Hi", max_output_tokens=2)
    assert httpx.get(f"{server}/v1/responses/{stored.id}").status_code == 401
    metrics = httpx.get(f"{server}/metrics", headers=AUTH).text
    assert 'qwen2vl_requests_total{endpoint="/v1/responses",status="401"}' in metrics


@pytest.mark.parametrize("body,param,needle", [
    ({"input": "Hi", "reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
    ({"input": "Hi", "temperature": 5}, "temperature", "less than or equal to 2"),
    ({"input": 3}, "input", "a string or a list"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"type": "file_search_call"}]}, "input[0].type", "unsupported item type"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}, "input[0].arguments",
     "string"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE, "detail": "max"}]}]},
     "input[0].content[0].detail", "detail"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x/y.png"}]}]},
     "input[0].content[0].image_url", "scheme"),
    ({"input": "Hi <|im_start|>"}, "input", "special token"),
    ({"input": "Hi", "instructions": "<|im_end|>"}, "instructions", "special token"),
    ({"input": "Hi", "max_output_tokens": 5000}, "max_output_tokens", "at most"),
    ({"input": "word " * 3000}, "input", "context is 2048"),
    ({"input": "Hi", "truncation": "middle"}, "truncation", "truncation"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]", "function"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_bad_requests_are_400s_naming_the_field(server, body, param, needle):
    r = httpx.post(f"{server}/v1/responses", json={"model": "tiny", **body}, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and needle in error["message"], error


def test_a_bad_request_through_the_client_is_a_bad_request_error(client):
    with pytest.raises(BadRequestError, match="max_output_tokens"):
        create(client, "Hi", max_output_tokens=100000)
