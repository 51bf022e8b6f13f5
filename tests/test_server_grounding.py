"""Grounded answers through the real server: the `grounding` field and `skip_special_tokens`.

The tiny random model can't ground anything by itself, so the answer is forced token by token
with a logits processor (as in the web test); everything after that is the real server path.
"""

import pytest
import torch

from tests.helpers.media import data_uri, png_bytes

ANSWER = "The <|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,900)<|box_end|> sleeps."


@pytest.fixture(scope="module")
def client():
    from openai import OpenAI

    from qwen2vl.server.limits import ServerLimits
    from tests.helpers.server import running_server

    with running_server(ServerLimits(), api_key="k") as (url, app):
        service = app.state.service
        tokenizer, eos = service.processor.tokenizer, service.processor.eos_token_ids[0]
        generate = service.engine.generate

        def generate_forced(prompt, params, **kw):
            ids = tokenizer.encode(ANSWER, allow_special=True) + [eos]

            def force(done, logits):
                out = torch.full_like(logits, float("-inf"))
                out[ids[min(len(done), len(ids) - 1)]] = 0.0
                return out

            params.logits_processors.append(force)
            return generate(prompt, params, **kw)

        service.engine.generate = generate_forced
        yield OpenAI(base_url=url + "/v1", api_key="k")


def ask(client, **extra):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(200, 100))}},
        {"type": "text", "text": "Where is the cat?"}]}]
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, **extra)


def test_grounding_field_in_image_pixels(client):
    message = ask(client).choices[0].message
    assert message.content == "The cat(100,200),(500,900) sleeps."  # special tokens skipped by default
    [region] = message.model_extra["grounding"]
    # 0-1000 scale -> the 200x100 image's pixels
    assert region["label"] == "cat" and region["box"] == [20, 20, 100, 90]


def test_skip_special_tokens_false_keeps_the_markup(client):
    message = ask(client, extra_body={"skip_special_tokens": False}).choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["grounding"][0]["box"] == [20, 20, 100, 90]


def test_a_stream_carries_grounding_on_its_last_chunk(client):
    chunks = list(ask(client, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The cat(100,200),(500,900) sleeps."
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    [region] = last.choices[0].delta.model_extra["grounding"]  # as the whole answer's message has it
    assert region == ask(client).choices[0].message.model_extra["grounding"][0]
    assert region["label"] == "cat" and region["box"] == [20, 20, 100, 90]
    assert all("grounding" not in (c.choices[0].delta.model_extra or {}) for c in chunks if c is not last)
