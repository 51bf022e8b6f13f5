"""Shared by the server tests: a tiny random-weight checkpoint with the real Qwen tokenizer, a real
server (uvicorn on a free loopback port, in a thread of the test process), and media makers.

The checkpoint is built once into .cache/ (transformers is the oracle that writes it; the server
never imports transformers). Its pixel budget is small (at most 64 tokens per image) so tests
stay fast; tests that need big images raise the server's --max-pixels ceiling instead.
"""

import base64
import fcntl
import io
import json
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tests.helpers.qwen_tokenizer import CACHE, qwen_tokenizer_dir

CHECKPOINT = CACHE / "server_tiny_qwen2vl"
BUILD = "2"
PREPROCESSOR = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}
MAX_MODEL_LEN = 2048


def tiny_checkpoint() -> Path:
    """Folder with config, random weights (vocab 151936, so the real tokenizer's ids fit), tokenizer
    files and a small-budget preprocessor_config.json."""
    stamp = CHECKPOINT / "BUILD"
    if stamp.is_file() and stamp.read_text() == BUILD:
        return CHECKPOINT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "server_tiny_qwen2vl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == BUILD):
            from tests.helpers.checkpoints import build_reference, save_checkpoint

            tmp = Path(tempfile.mkdtemp(dir=CACHE))
            save_checkpoint(build_reference(vocab_size=151936), tmp, tokenizer_dir=qwen_tokenizer_dir())
            (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
            (tmp / "BUILD").write_text(BUILD)
            shutil.rmtree(CHECKPOINT, ignore_errors=True)
            tmp.rename(CHECKPOINT)
    return CHECKPOINT


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(limits, api_key: str | None = "test-key", model=None, **engine_args):
    """Yield (base_url, app) of a real server on loopback serving `model` (default: the tiny
    checkpoint); stopped and its engine shut down after."""
    import uvicorn

    from qwen2vl.engine.async_engine import AsyncLLM
    from qwen2vl.server.app import create_app

    engine_args = {"dtype": "float32", "device": "cpu", "kv_cache_gib": 0.02, "max_model_len": MAX_MODEL_LEN,
                   **engine_args}
    engine = AsyncLLM(str(model or tiny_checkpoint()), **engine_args)
    app = create_app(engine, limits, api_key=api_key, model_name="tiny")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


# -- media -----------------------------------------------------------------------------------


def png_bytes(width=64, height=48, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames=8, width=64, height=48, fps=4) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
