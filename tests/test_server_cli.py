"""`qwen2vl serve` arguments -> server limits and media policy; the defaults are the safe ones."""

import argparse

import pytest

from qwen2vl.processing.vision_config import VisionProcessingConfig
from qwen2vl.server.cli import add_serve_arguments
from qwen2vl.server.limits import MiB, ServerLimits, limits_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_safe():
    args = parse("some/folder")
    assert (args.model, args.host, args.port) == ("some/folder", "127.0.0.1", 8000)
    policy = limits_from_args(args).media_policy()
    assert not policy.allow_local_files and not policy.allow_private and policy.allowed_hosts is None
    assert policy.max_image_bytes == 20 * MiB and policy.timeout == 20.0


def test_flags_reach_limits_and_policy(tmp_path):
    args = parse("m", "--host", "0.0.0.0", "--api-key", "k", "--max-body-mb", "4", "--max-images-per-request", "2",
                 "--max-image-mb", "1.5", "--max-pixels", "200704", "--max-video-frames", "32", "--max-queue", "5",
                 "--max-stored-responses", "7", "--max-stored-responses-mb", "2",
                 "--allowed-media-domains", "example.com", ".cdn.example", "--allow-private-media",
                 "--allowed-local-media-path", str(tmp_path))
    limits = limits_from_args(args)
    assert (limits.max_body_bytes, limits.max_images, limits.max_pixels, limits.max_queue) == (4 * MiB, 2, 200704, 5)
    assert (limits.max_stored_responses, limits.max_stored_bytes) == (7, 2 * MiB)
    policy = limits.media_policy()
    assert policy.allow_local_files and policy.local_roots == (str(tmp_path.resolve()),)
    assert policy.allowed_hosts == ("example.com", ".cdn.example") and policy.allow_private
    assert policy.max_image_bytes == int(1.5 * MiB) and policy.max_video_frames == 32


def test_non_positive_limits_are_refused():
    with pytest.raises(ValueError, match="max_queue must be positive"):
        ServerLimits(max_queue=0)


CFG = VisionProcessingConfig(max_pixels=28 * 28 * 1280)


@pytest.mark.parametrize("kind,given,ceiling,expected", [
    ("image", {}, None, {"max_pixels": 28 * 28 * 1280, "min_pixels": 56 * 56}),
    ("image", {"max_pixels": 10**9}, None, {"max_pixels": 28 * 28 * 1280, "min_pixels": 56 * 56}),
    ("image", {"max_pixels": 10**9}, 28 * 28 * 4096, {"max_pixels": 28 * 28 * 4096, "min_pixels": 56 * 56}),
    ("image", {}, 28 * 28 * 16, {"max_pixels": 28 * 28 * 16, "min_pixels": 56 * 56}),
    ("image", {"min_pixels": 10**8}, None, {"max_pixels": 28 * 28 * 1280, "min_pixels": 28 * 28 * 1280}),
    ("video", {"fps": 30.0, "nframes": 10_000}, None,
     {"fps": 4.0, "nframes": 256, "max_frames": 256, "max_pixels": 768 * 28 * 28, "min_pixels": 128 * 28 * 28}),
    ("video", {"max_frames": 8}, 28 * 28 * 64,
     {"max_frames": 8, "max_pixels": 28 * 28 * 64, "min_pixels": 28 * 28 * 64}),
])
def test_vision_options_are_clamped_to_the_ceilings(kind, given, ceiling, expected):
    assert ServerLimits(max_pixels=ceiling).clamp(kind, given, CFG) == expected


def test_quantization_flag_reaches_the_engine(monkeypatch):
    import qwen2vl.engine.async_engine as async_engine
    from qwen2vl.server.cli import run_serve

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(model, **kwargs):
        seen.update(kwargs, model=model)
        raise Stop

    monkeypatch.setattr(async_engine, "AsyncLLM", fake_engine)
    with pytest.raises(Stop):
        run_serve(parse("some/folder", "--device", "cpu", "--quantization", "int4"))
    assert seen["quantization"] == "int4" and seen["device"] == "cpu"
    with pytest.raises(Stop):
        run_serve(parse("some/folder", "--quantization", "int4-g128"))
    assert seen["quantization"] == "int4-g128"
    with pytest.raises(SystemExit):
        parse("m", "--quantization", "fp8")
