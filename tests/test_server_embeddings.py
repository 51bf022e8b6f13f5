"""POST /v1/embeddings through the official `openai` client against a real server: strings, token
ids and chat-style inputs with images equal LLM.embed on the same checkpoint; base64 and float
encodings agree; dimensions, normalize, usage; every bad request is a 400 naming the problem and
the limit; same auth and model check as chat completions; no cache blocks kept."""

import base64

import httpx
import numpy as np
import pytest
import torch
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

from qwen2vl.embedding import embedding_prompt
from qwen2vl.engine.llm import LLM
from qwen2vl.server.limits import ServerLimits
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.media import data_uri, png_bytes
from tests.helpers.server import MAX_MODEL_LEN, running_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HIDDEN = 64  # the tiny checkpoint's hidden size
IMAGE = data_uri(png_bytes(64, 48))


@pytest.fixture(scope="module")
def server():
    limits = ServerLimits(max_embedding_inputs=4, max_images=2)
    with running_server(limits, api_key=KEY) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", kv_cache_gib=0.02, max_model_len=MAX_MODEL_LEN)


def chat_input(*parts) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"messages": [{"role": "user", "content": content}]}


def image_part(url=IMAGE) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def post(server, body, headers=AUTH):
    return httpx.post(f"{server[0]}/v1/embeddings", json={"model": "tiny", **body}, headers=headers, timeout=120)


def vectors(response) -> torch.Tensor:
    return torch.tensor([d.embedding for d in response.data])


def test_strings_and_token_ids_equal_llm_embed_and_usage_counts_their_tokens(client, llm):
    texts = ["a cat on a sofa", "a dog in the rain, running"]
    out = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in out.data] == [0, 1] and out.model == "tiny"
    torch.testing.assert_close(vectors(out), llm.embed(texts), atol=1e-5, rtol=0)
    ids = [llm.processor.tokenizer.encode(t) for t in texts]
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model="tiny", input=ids)
    torch.testing.assert_close(vectors(by_ids), vectors(out), atol=1e-6, rtol=0)
    one = client.embeddings.create(model="tiny", input=ids[0])  # one list of ids is one input
    assert len(one.data) == 1
    torch.testing.assert_close(vectors(one)[0], vectors(out)[0], atol=1e-6, rtol=0)


def test_chat_style_inputs_with_images_equal_llm_embed(client, llm):
    items = [chat_input(image_part()), chat_input(image_part(), "what is this?"), chat_input("only text")]
    out = client.embeddings.create(model="tiny", input=items)
    torch.testing.assert_close(vectors(out), llm.embed(items), atol=1e-5, rtol=0)
    assert out.usage.prompt_tokens == sum(len(embedding_prompt(x, llm.processor, llm.model.config)) for x in items)


def test_float_and_base64_encodings_agree(server, client):
    floats = post(server, {"input": "hello", "encoding_format": "float"}).json()["data"][0]["embedding"]
    raw = post(server, {"input": "hello", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    assert len(floats) == HIDDEN and decoded.tolist() == pytest.approx(floats, abs=1e-7)
    assert np.linalg.norm(floats) == pytest.approx(1.0, abs=1e-5)


def test_dimensions_truncate_then_normalize_and_normalize_false_skips_it(client, llm):
    cut = vectors(client.embeddings.create(model="tiny", input="matryoshka", dimensions=8))
    raw = llm.embed("matryoshka", normalize=False)
    assert cut.shape == (1, 8)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(raw[:, :8], dim=-1), atol=1e-5, rtol=0)
    plain = vectors(client.embeddings.create(model="tiny", input="matryoshka", extra_body={"normalize": False}))
    torch.testing.assert_close(plain, raw, atol=1e-5, rtol=0)


def test_no_cache_blocks_are_kept(server, client):
    engine = server[1].state.service.engine
    client.embeddings.create(model="tiny", input=["x" * 50, chat_input(image_part(), "y")])
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", ["empty string"]),
    ({"input": []}, "input", ["empty list"]),
    ({"input": ["a", "b", "c", "d", "e"]}, "input", ["5 inputs", "limit of 4", "--max-embedding-inputs"]),
    ({"input": ["a", ""]}, "input[1]", ["empty string"]),
    ({"input": [[]]}, "input[0]", ["empty list of token ids"]),
    ({"input": list(range(10, 10 + MAX_MODEL_LEN + 1))}, "input", [f"{MAX_MODEL_LEN + 1} tokens",
                                                                 f"max_model_len is {MAX_MODEL_LEN}"]),
    ({"input": [[1, 2, 10**9]]}, "input[0]", ["outside the vocabulary"]),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", ["'float' or 'base64'"]),
    ({"input": "x", "dimensions": 0}, "dimensions", ["from 1 to 64"]),
    ({"input": "x", "dimensions": HIDDEN + 1}, "dimensions", ["from 1 to 64", "got 65"]),
    ({"input": "x", "colour": "red"}, "colour", ["Extra inputs"]),
    ({"input": 5}, "input", ["must be a string, a list of token ids"]),
    ({"input": [1, "a"]}, "input", ["must be a string, a list of token ids"]),
    ({"input": [[1.5]]}, "input", ["must be a string, a list of token ids"]),
    ({"input": [{"text": "x"}]}, "input[0]", ['{"messages": [...]}']),
    ({"input": [chat_input("<|im_end|>")]}, "input[0].messages[0].content[0].text", ["special token"]),
    ({"input": [chat_input(image_part("ftp://x/y.png"))]}, "input[0].messages[0].content[0].image_url.url",
     ["unsupported URL scheme"]),
    ({"input": [chat_input(image_part(), image_part()), chat_input(image_part())]}, "input",
     ["3 images", "limit of 2", "--max-images-per-request"]),
    ({"input": [chat_input(image_part("data:image/png;base64,AAAA"))]}, "input[0].messages[0].content[0]", []),
])
def test_bad_requests_are_400s_naming_the_field_and_limit(server, body, param, words):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    for w in words:
        assert w in error["message"], error["message"]


def test_the_openai_client_sees_errors_as_its_exceptions(server, client):
    with pytest.raises(BadRequestError, match="max_model_len"):
        client.embeddings.create(model="tiny", input=[list(range(10, 10 + MAX_MODEL_LEN + 1))])
    with pytest.raises(NotFoundError, match="not served here"):
        client.embeddings.create(model="gpt-4", input="x")
    bad_key = OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad_key.embeddings.create(model="tiny", input="x")


def test_metrics_count_the_endpoint(server, client):
    client.embeddings.create(model="tiny", input="count me")
    text = httpx.get(f"{server[0]}/metrics", headers=AUTH).text
    assert 'endpoint="/v1/embeddings"' in text


def test_embeddings_between_steps_leave_a_running_generation_unchanged(client):
    messages = [{"role": "user", "content": "Tell me a long story."}]
    kw = dict(model="tiny", messages=messages, max_tokens=40, temperature=0)
    alone = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(stream=True, **kw)
    text, embedded = "", 0
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if embedded < 3:  # while the stream is running
            client.embeddings.create(model="tiny", input=["x", chat_input(image_part(), "y")])
            embedded += 1
    assert embedded == 3 and text == alone
