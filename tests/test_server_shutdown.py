"""A shut-down engine answers 503 (not 500) through the official `openai` client: chat completions
streamed and not, and embeddings."""

import pytest
from openai import APIStatusError, OpenAI

from qwen2vl.server.limits import ServerLimits
from tests.helpers.server import running_server


@pytest.fixture(scope="module")
def stopped():
    with running_server(ServerLimits(), api_key="k") as (url, app):
        app.state.service.engine.shutdown()
        yield url, OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)


def check_503(call):
    with pytest.raises(APIStatusError) as info:
        call()
    assert info.value.status_code == 503
    assert info.value.body["code"] == "engine_stopped" and "shut down" in info.value.body["message"]


def test_chat_completions_answer_503(stopped):
    _, client = stopped
    messages = [{"role": "user", "content": "hi"}]
    check_503(lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=2))
    check_503(lambda: list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                                          stream=True)))


def test_embeddings_answer_503(stopped):
    _, client = stopped
    check_503(lambda: client.embeddings.create(model="tiny", input="hi"))

