"""The server through the official `openai` client: text, images (data URI, http, file://), video,
several images, streaming, n/seed/logprobs/stop, tools round trip, JSON schema, usage, metrics,
token counts, and a client disconnect freeing the cache. One real server for the module."""

import io
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

from qwen2vl.server.limits import ServerLimits
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.media import data_uri, mp4_bytes, png_bytes
from tests.helpers.server import running_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = png_bytes(64, 48)
VIDEO = mp4_bytes(frames=8)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "img.png").write_bytes(IMAGE)
    (folder / "clip.mp4").write_bytes(VIDEO)
    (folder / "frame4.png").write_bytes(png_bytes(84, 56, seed=14))
    return folder


@pytest.fixture(scope="module")
def media_url(media_dir):
    """A plain HTTP server on loopback serving the media folder."""
    handler = partial(SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(media_dir):
    # loopback media is allowed here (the test's HTTP server); the SSRF tests run without it
    limits = ServerLimits(allow_private_media=True, allowed_local_media_path=(str(media_dir),))
    with running_server(limits, api_key=KEY) as (url, _app):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, content, **kw):
    kw = {"model": "tiny", "max_tokens": 6, "temperature": 0, **kw}
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def image_part(url, **opts):
    return {"type": "image_url", "image_url": {"url": url, **opts}}


def count(server, content, **body):
    r = httpx.post(f"{server}/v1/token_count", json={"messages": [{"role": "user", "content": content}], **body},
                   headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_needs_no_key_and_models_lists_the_served_name(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_text_answer_equals_the_engine_and_usage_adds_up(server, client):
    from qwen2vl.engine.llm import LLM
    from qwen2vl.engine.sampling_params import SamplingParams

    r = ask(client, "Describe a cat.", max_tokens=7)
    llm = LLM(str(tiny_checkpoint()), dtype="float32", kv_cache_gib=0.02, max_model_len=2048)
    ref = llm.chat([{"role": "user", "content": "Describe a cat."}], SamplingParams(temperature=0, max_tokens=7))[0]
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) == count(server, "Describe a cat.")["prompt_tokens"]
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_by_data_uri_costs_what_token_count_says(server, client):
    content = [image_part(data_uri(IMAGE)), {"type": "text", "text": "What is this?"}]
    counted = count(server, content)
    item = counted["items"][0]
    # 64x48 -> smart_resize to 56x56 (rounded to 28s) -> 4x4 patches -> 4 tokens after the 2x2 merge
    assert (item["width"], item["height"], item["resized_width"], item["resized_height"]) == (64, 48, 56, 56)
    assert item["grid_thw"] == [1, 4, 4] and item["tokens"] == counted["visual_tokens"] == 4
    r = ask(client, content)
    assert r.usage.prompt_tokens == counted["prompt_tokens"]
    assert r.choices[0].message.content is not None


def test_continue_final_message_and_chat_template_kwargs_in_the_body(server, client):
    """vLLM's request fields, sent as the openai client sends extras (extra_body)."""
    from qwen2vl.processing.processor import Processor

    proc = Processor.from_pretrained(tiny_checkpoint())
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    prefilled = proc(msgs, continue_final_message=True)["input_ids"]
    assert r.usage.prompt_tokens == len(prefilled)  # ends on "The colour is": no <|im_end|>, no new turn
    default = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0,
                                             extra_body={"continue_final_message": True})  # implies no prompt
    assert default.usage.prompt_tokens == len(prefilled)
    body = {"messages": msgs, "continue_final_message": True}
    counted = httpx.post(f"{server}/v1/token_count", json=body, headers=AUTH).json()
    assert counted["prompt_tokens"] == len(prefilled)
    content = [image_part(data_uri(IMAGE)), {"type": "text", "text": "What is this?"}]
    plain, numbered = (ask(client, content, extra_body=extra).usage.prompt_tokens
                       for extra in ({}, {"chat_template_kwargs": {"add_vision_id": True}}))
    assert numbered == plain + len(proc.tokenizer.encode("Picture 1: "))
    assert count(server, content, chat_template_kwargs={"add_vision_id": True})["prompt_tokens"] == numbered


def test_image_by_http_url_and_file_url_give_the_same_prompt(server, client, media_url, media_dir):
    by_data = ask(client, [image_part(data_uri(IMAGE)), {"type": "text", "text": "Hi"}])
    by_http = ask(client, [image_part(f"{media_url}/img.png", detail="high"), {"type": "text", "text": "Hi"}])
    by_file = ask(client, [image_part(f"file://{media_dir}/img.png"), {"type": "text", "text": "Hi"}])
    assert by_data.usage.prompt_tokens == by_http.usage.prompt_tokens == by_file.usage.prompt_tokens
    texts = {r.choices[0].message.content for r in (by_data, by_http, by_file)}
    assert len(texts) == 1


def test_video_and_multi_image(server, client, media_url):
    video = {"type": "video_url", "video_url": {"url": data_uri(VIDEO, "video/mp4"), "fps": 4}}
    counted = count(server, [video, {"type": "text", "text": "What happens?"}])
    (item,) = counted["items"]
    assert item["type"] == "video" and item["frames"] == 8 and item["grid_thw"][0] == 4  # 8 frames in pairs
    r = ask(client, [video, {"type": "text", "text": "What happens?"}])
    assert r.usage.prompt_tokens == counted["prompt_tokens"]
    by_url = ask(client, [{"type": "video_url", "video_url": {"url": f"{media_url}/clip.mp4", "fps": 4}},
                          {"type": "text", "text": "What happens?"}])
    assert by_url.usage.prompt_tokens == r.usage.prompt_tokens

    two = [image_part(data_uri(IMAGE)), image_part(data_uri(png_bytes(120, 90, seed=1))),
           {"type": "text", "text": "Compare."}]
    counted = count(server, two)
    assert [i["tokens"] for i in counted["items"]] == [4, 12]  # 120x90 -> 112x84 -> 8x6 patches -> 12
    assert ask(client, two).usage.prompt_tokens == counted["prompt_tokens"]


def test_video_as_a_list_of_frames_answers_as_the_engine_does(server, client, media_url):
    """Qwen form {"type": "video", "video": [frame URLs]} (what qwen-vl-utils takes): every frame
    used as given, costed from the frames' headers, answered as LLM answers the same PIL frames."""
    from qwen2vl.engine.llm import LLM
    from qwen2vl.engine.sampling_params import SamplingParams

    frames = [png_bytes(84, 56, seed=10 + i) for i in range(5)]
    size = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 6}  # options on the part, as qwen-vl-utils reads them
    part = {"type": "video", "video": [data_uri(f) for f in frames[:4]] + [f"{media_url}/frame4.png"], **size}
    counted = count(server, [part, {"type": "text", "text": "What moves?"}])
    (item,) = counted["items"]
    assert item["frames"] == 5 and item["grid_thw"] == [3, 4, 6]  # 5 frames -> 3 pairs (the last repeated)
    r = ask(client, [part, {"type": "text", "text": "What moves?"}], max_tokens=5)
    assert r.usage.prompt_tokens == counted["prompt_tokens"]

    llm = LLM(str(tiny_checkpoint()), dtype="float32", kv_cache_gib=0.02, max_model_len=2048)
    pil = [Image.open(io.BytesIO(f)) for f in frames]
    messages = [{"role": "user", "content": [{"type": "video", "video": pil, **size},
                                             {"type": "text", "text": "What moves?"}]}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5))[0]
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == len(ref.prompt_token_ids)

    for bad, where in (({"type": "video", "video": []}, "non-empty list of frame URLs"),
                       ({"type": "video", "video": [data_uri(frames[0])] * 2, "nframes": 2}, "nframes"),
                       ({"type": "video", "video": ["ftp://x/y.png"]}, r"video\[0\]: unsupported URL scheme")):
        with pytest.raises(BadRequestError, match=where):
            ask(client, [bad, {"type": "text", "text": "?"}])


def test_mm_processor_kwargs_per_request_per_item_and_clamped(server):
    big = data_uri(png_bytes(400, 300, seed=2))
    default = count(server, [image_part(big)])["visual_tokens"]
    assert default == 54  # the checkpoint's max_pixels 28*28*64: 400x300 -> 252x168 -> 9x6 tokens
    assert count(server, [image_part(big)], mm_processor_kwargs={"max_pixels": 28 * 28 * 16})["visual_tokens"] <= 16
    assert count(server, [image_part(big, max_pixels=28 * 28 * 4)],
                 mm_processor_kwargs={"max_pixels": 28 * 28 * 16})["visual_tokens"] <= 4  # the item wins
    # asking for more than the ceiling gets the ceiling, not an error
    assert count(server, [image_part(big, max_pixels=10**9)])["visual_tokens"] == default


def test_streaming_matches_the_whole_answer_and_reports_usage(client):
    whole = ask(client, "Tell me a story.", max_tokens=12)
    stream = ask(client, "Tell me a story.", max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_logprobs_and_stop(client):
    a = ask(client, "Pick a word.", n=2, temperature=1.0, seed=7, max_tokens=5)
    b = ask(client, "Pick a word.", n=2, temperature=1.0, seed=7, max_tokens=5)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 10  # both completions counted

    r = ask(client, "Pick a word.", logprobs=True, top_logprobs=3, max_tokens=4)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert entries[0].logprob == pytest.approx(entries[0].top_logprobs[0].logprob)  # greedy takes the best

    full = ask(client, "Count.", max_tokens=10).choices[0].message.content
    stop = full[len(full) // 2 :][:3]
    if stop.strip():
        cut = ask(client, "Count.", max_tokens=10, stop=[stop])
        assert cut.choices[0].message.content == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tools_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=100,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f") and len(args["city"]) <= 12

    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=5,
                                            temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_tool_calls_stream(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="required", max_tokens=300, stream=True)
    calls, finish, pieces = {}, None, {}
    for c in stream:
        for d in c.choices[0].delta.tool_calls or []:
            if d.index not in calls:  # a call's first delta: its id, type and name, as OpenAI sends it
                assert d.id.startswith("call_") and d.type == "function" and d.function.name == "get_weather"
            calls.setdefault(d.index, {"name": "", "arguments": ""})
            calls[d.index]["name"] += d.function.name or ""
            calls[d.index]["arguments"] += d.function.arguments or ""
            pieces[d.index] = pieces.get(d.index, 0) + bool(d.function.arguments)
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for index, call in calls.items():
        assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city", "unit"}
        assert pieces[index] > 3  # the arguments stream as they are generated, not in one delta


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def test_json_schema_output_parses_and_matches(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Make up a person."}], max_tokens=200, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content  # the grammar ended it
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"name", "age", "tags"}
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 10
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
        assert len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}


def test_the_grammar_table_is_built_before_the_server_serves(monkeypatch):
    """The first json_schema request must not pay for llguidance's tokenizer table (~2-3 s, holding
    the GIL, so every stream would stall meanwhile): create_app builds it, once."""
    import llguidance

    from qwen2vl.engine.async_engine import AsyncLLM
    from qwen2vl.server.app import create_app

    built, real = [], llguidance.LLTokenizer
    monkeypatch.setattr(llguidance, "LLTokenizer", lambda *a, **kw: built.append(1) or real(*a, **kw))
    engine = AsyncLLM(str(tiny_checkpoint()), dtype="float32", kv_cache_gib=0.02, max_model_len=2048)
    try:
        compiler = create_app(engine, ServerLimits()).state.service.compiler
        assert built == [1]
        compiler.constraint(compiler.json_grammar({"type": "json_object"}), "response_format")
        assert built == [1]
    finally:
        engine.shutdown()


def test_the_web_page_is_found_in_one_place(monkeypatch, tmp_path):
    """server/web.py alone knows where index.html is: without it, no route; with it, served."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from qwen2vl.server import web

    monkeypatch.setattr(web, "PAGE", tmp_path / "missing.html")
    app = FastAPI()
    assert web.add_web_page(app) is False and TestClient(app).get("/").status_code == 404
    (tmp_path / "index.html").write_text("<!doctype html><title>t</title><script>let x = 1;</script>")
    monkeypatch.setattr(web, "PAGE", tmp_path / "index.html")
    assert web.add_web_page(app) is True
    page = TestClient(app).get("/")
    assert page.status_code == 200 and "let x = 1;" in page.text
    assert "sha256-" in page.headers["content-security-policy"]


def test_metrics_count_requests_tokens_and_ttft(server, client):
    ask(client, "One more.")
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['qwen2vl_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["qwen2vl_generation_tokens_total"] > 0 and values["qwen2vl_prompt_tokens_total"] > 0
    assert values["qwen2vl_time_to_first_token_seconds_count"] >= 1
    assert 0 <= values["qwen2vl_kv_cache_usage_ratio"] <= 1 and "qwen2vl_queue_length" in values
    assert httpx.get(f"{server}/metrics").status_code == 401


def gauges(server) -> dict:
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    return {k: float(v) for k, v in (line.split(" ") for line in text.splitlines()
                                     if line and not line.startswith("#") and "{" not in line)}


def wait_until_idle(server) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        g = gauges(server)
        if g["qwen2vl_requests_running"] == 0 and g["qwen2vl_kv_cache_usage_ratio"] == 0:
            break
        time.sleep(0.1)
    return g


LONG = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 1900,
        "temperature": 0}  # greedy runs the full 1900 tokens on this prompt


def test_client_disconnect_aborts_and_frees_the_cache(server):
    aborted = gauges(server)["qwen2vl_requests_aborted_total"]
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server}/v1/chat/completions",
                                                       json={**LONG, "stream": True}, headers=AUTH) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert gauges(server)["qwen2vl_requests_running"] >= 1
    g = wait_until_idle(server)
    assert g["qwen2vl_requests_running"] == 0 and g["qwen2vl_kv_cache_usage_ratio"] == 0
    assert g["qwen2vl_requests_aborted_total"] == aborted + 1 and g["qwen2vl_requests_in_flight"] == 0

    # the same without streaming: the client gives up waiting, the server notices and aborts
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json=LONG, headers=AUTH, timeout=httpx.Timeout(30, read=1.0))
    g = wait_until_idle(server)
    assert g["qwen2vl_requests_running"] == 0 and g["qwen2vl_kv_cache_usage_ratio"] == 0
    assert g["qwen2vl_requests_aborted_total"] == aborted + 2 and g["qwen2vl_requests_in_flight"] == 0
