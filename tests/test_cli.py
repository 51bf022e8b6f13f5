"""The `qwen2vl` command, run for real (`python -m qwen2vl ...` in a subprocess) against the tiny
random-weight checkpoint with the real Qwen tokenizer."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.media import mp4_bytes

REPO = Path(__file__).resolve().parents[1]
FAST = ["--dtype", "float32", "--kv-cache-gib", "0.05"]  # small cache: quick to allocate
STATS = re.compile(r"^\[(\d+) tokens, prompt (\d+), time to first token [\d.]+ s, [\d.]+ tokens/s\]$", re.M)


def qwen2vl(*args, stdin=None, env=None, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "qwen2vl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (1000, 500), (30, 90, 200)).save(folder / "wide.png")
    (folder / "clip.mp4").write_bytes(mp4_bytes(frames=16, width=64, height=48, fps=8))
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_one_shot_chat_streams_the_models_answer_and_reports_speed(ckpt, media):
    r = qwen2vl("chat", "--model", ckpt, "--image", media / "wide.png", *FAST, "--max-tokens", 6,
                "--temperature", 0, "What is in the picture?")
    assert r.returncode == 0, r.stderr
    assert "loading" in r.stderr and "ready in" in r.stderr
    (n, _prompt), = STATS.findall(r.stderr)
    assert n == "6"
    # the printed answer is what the engine generates for the same conversation
    from qwen2vl import LLM, SamplingParams

    llm = LLM(ckpt, dtype="float32", kv_cache_gib=0.05)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(media / "wide.png")},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, skip_special_tokens=False))[0].text
    assert r.stdout == want + "\n"


def test_interactive_chat_keeps_history_and_takes_commands(ckpt, media):
    script = "\n".join(["Hello.", f"/image {media / 'wide.png'}", "What colour is it?", "/reset", "Hello.",
                        f"/video {media / 'clip.mp4'}", "What happens?", "/nonsense", "/quit", "Never asked."]) + "\n"
    r = qwen2vl("chat", "--model", ckpt, *FAST, "--max-tokens", 3, "--max-pixels", 28 * 28 * 16, stdin=script)
    assert r.returncode == 0, r.stderr
    prompts = [int(p) for _, p in STATS.findall(r.stderr)]
    assert len(prompts) == 4, r.stderr  # nothing after /quit
    first, with_image, after_reset, with_video = prompts
    assert with_image > first + 16  # the first turn, its answer and a 16-token image
    assert after_reset == first  # /reset forgot everything
    assert with_video > first + 10
    assert "[image attached" in r.stderr and "[video attached" in r.stderr and "[conversation cleared]" in r.stderr
    assert "error: unknown command /nonsense" in r.stderr


def test_info_counts_parameters_from_the_headers(ckpt):
    r = qwen2vl("info", ckpt)
    assert r.returncode == 0, r.stderr
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        total = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
        vision = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("visual."))
    assert f"parameters  {total:,} (language {total - vision:,}, vision {vision:,})" in r.stdout
    assert f"stored as   f32 {total:,}" in r.stdout
    config = json.loads((ckpt / "config.json").read_text())
    assert f"vocab {config['text_config']['vocab_size']}" in r.stdout
    assert re.search(r"weights in bfloat16/float16 [\d.]+ MiB, in float32 [\d.]+ MiB", r.stdout)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_tokens_for_an_image_with_published_and_model_settings(ckpt, media):
    from qwen2vl.processing.image import smart_resize

    r = qwen2vl("tokens", media / "wide.png")
    assert r.returncode == 0, r.stderr
    h, w = smart_resize(500, 1000, 28, 56 * 56, 28 * 28 * 16384)
    assert f"1000x500 -> resized to {w}x{h}" in r.stdout
    assert f"tokens      {h * w // 28 // 28} visual tokens" in r.stdout and "published" in r.stdout
    r = qwen2vl("tokens", media / "wide.png", "--model", ckpt)  # this checkpoint allows 64 tokens per image
    h, w = smart_resize(500, 1000, 28, 28 * 28 * 4, 28 * 28 * 64)
    assert f"tokens      {h * w // 28 // 28} visual tokens" in r.stdout and h * w // 784 <= 64
    r = qwen2vl("tokens", media / "wide.png", "--max-pixels", 28 * 28 * 10)
    h, w = smart_resize(500, 1000, 28, 56 * 56, 28 * 28 * 10)
    assert f"tokens      {h * w // 784} visual tokens" in r.stdout


def test_tokens_for_a_rotated_photo_agree_with_the_processor(tmp_path):
    """A 640x200 JPEG tagged "rotate 90" is seen as 200x640: the count must be the processor's."""
    from qwen2vl.processing.image import load_image, preprocess_image
    from qwen2vl.processing.vision_config import VisionProcessingConfig

    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (640, 200), (90, 140, 30)).save(tmp_path / "photo.jpg", exif=exif)
    r = qwen2vl("tokens", tmp_path / "photo.jpg")
    assert r.returncode == 0, r.stderr
    cfg = VisionProcessingConfig.from_dict({"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384})
    pixels, (t, h, w) = preprocess_image(load_image(str(tmp_path / "photo.jpg")), cfg)
    assert (h, w) == (46, 14)  # portrait once rotated
    assert "image       200x640 -> resized to 196x644" in r.stdout
    assert f"grid        t={t}, h={h}, w={w}" in r.stdout
    assert f"tokens      {pixels.shape[0] // 4} visual tokens" in r.stdout


def test_tokens_for_a_video(media):
    from qwen2vl.processing.video import video_token_count
    from qwen2vl.processing.vision_config import VisionProcessingConfig

    r = qwen2vl("tokens", media / "clip.mp4", "--fps", 4)
    assert r.returncode == 0, r.stderr
    assert "64x48, 16 frames at 8 fps (2.0 s) -> 8 frames" in r.stdout
    want = video_token_count(48, 64, VisionProcessingConfig(), num_frames=8)
    assert f"grid        t={want.grid_thw[0]}, h={want.grid_thw[1]}, w={want.grid_thw[2]}" in r.stdout
    assert f"tokens      {want.num_tokens} visual tokens" in r.stdout


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return folder


UNREACHABLE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}


@pytest.mark.parametrize("args, env, message", [
    (["chat", "--model", "/no/such/folder", "hi"], None, "no such folder"),
    (["chat", "hi"], UNREACHABLE_HUB, "pass its local folder"),  # the default model, hub unreachable
    (["download"], UNREACHABLE_HUB, "could not download 'Qwen/Qwen2-VL-2B-Instruct'"),
    (["info", "{broken}"], None, "not a safetensors file"),
    (["info", "{media}"], None, "no config.json"),
    (["tokens", "{media}/notes.txt"], None, "neither an image nor a video"),
    (["tokens", "{media}/missing.png"], None, "file not found"),
    (["chat", "--model", "{broken}", "--image", "{media}/missing.png", "hi"], None, "image file not found"),
])
def test_errors_are_one_line_without_a_traceback(args, env, message, media, broken, tmp_path):
    env = {**(env or {}), "HF_HOME": str(tmp_path / "hf")}  # an empty hub cache
    r = qwen2vl(*[a.format(media=media, broken=broken) for a in args], env=env, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert r.stderr.splitlines()[-1] == errors[0]


@pytest.mark.parametrize("name", ["-x/y", "_x/y", "x/.y", "a/b/c", "x/y!"])
def test_info_and_chat_agree_on_what_a_hub_repo_id_is(name, monkeypatch):
    """One pattern (hub.py's): a name that is neither a folder nor a repo id never reaches the hub."""
    import huggingface_hub

    from qwen2vl import cli, hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("the hub was asked"))
    for look_up in (cli.checkpoint_headers, hub.resolve_model_path):
        with pytest.raises(FileNotFoundError, match="not a hub repo id"):
            look_up(name)


def test_serve_is_the_servers_command():
    r = qwen2vl("serve", "--help")
    assert r.returncode == 0 and "--api-key" in r.stdout and "--port" in r.stdout


def test_draw_saves_the_image_with_the_answers_boxes(tmp_path, capsys):
    from qwen2vl.chat_cli import ChatSession

    Image.new("RGB", (400, 200), "white").save(tmp_path / "in.png")
    args = argparse.Namespace(system=None, draw=str(tmp_path / "out.png"), min_pixels=None, max_pixels=None, fps=None)
    session = ChatSession(llm=None, args=args)
    session.attach("image", str(tmp_path / "in.png"))
    session._show_grounding("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,800)<|box_end|>")
    assert "box cat: (40,40) (200,160)" in capsys.readouterr().err
    out = Image.open(tmp_path / "out.png").convert("RGB")
    assert out.getpixel((40, 100)) != (255, 255, 255) and out.getpixel((120, 100)) == (255, 255, 255)


@pytest.mark.parametrize("error, expected", [
    (MemoryError(), "out of memory"),
    (RuntimeError("CUDA\nbroke"), "RuntimeError: CUDA broke (set QWEN2VL_DEBUG=1 for the traceback)"),
    (FileNotFoundError("x: no such folder"), "x: no such folder"),
])
def test_explain_gives_one_line_with_a_next_step(error, expected):
    import torch

    from qwen2vl.cli_errors import explain

    assert expected in explain(error) and "\n" not in explain(error)
    assert "--max-pixels" in explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
