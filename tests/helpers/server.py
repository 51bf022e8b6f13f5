"""A real server for tests: uvicorn on a free loopback port, in a thread of the test process, over
the tiny checkpoint (checkpoints.tiny_checkpoint)."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from tests.helpers.checkpoints import tiny_checkpoint

MAX_MODEL_LEN = 2048


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(limits, api_key: str | None = "test-key", model=None, engine=None, **engine_args):
    """Yield (base_url, app) of a real server on loopback serving `model` (default: the tiny
    checkpoint), or an AsyncLLM already running (`engine`); stopped and its engine shut down after."""
    from qwen2vl.engine.async_engine import AsyncLLM
    from qwen2vl.server.app import create_app

    engine_args = {"dtype": "float32", "device": "cpu", "kv_cache_gib": 0.02, "max_model_len": MAX_MODEL_LEN,
                   **engine_args}
    engine = engine or AsyncLLM(str(model or tiny_checkpoint()), **engine_args)
    app = create_app(engine, limits, api_key=api_key, model_name="tiny")
    try:
        with serving(app) as url:
            yield url, app
    finally:
        engine.shutdown()


@contextmanager
def serving(app):
    """Yield the base URL of `app` run by uvicorn on a free loopback port, in a thread; stopped after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def ask_all(client, conversations: list, model: str = "tiny", max_tokens: int = 12) -> list[str]:
    """The greedy answer to each conversation through an openai `client`, every one asked at once
    (a thread each), in the conversations' order."""
    def ask(messages):
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(conversations)) as pool:
        return list(pool.map(ask, conversations))
