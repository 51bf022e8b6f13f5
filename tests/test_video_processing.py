"""Video sampling, sizing and patches against qwen-vl-utils (the Qwen team's video pipeline), run
here with stand-ins for torchvision and decord (tests/helpers/video_reference.py)."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.processing import video as video_mod
from qwen2vl.processing.media import MediaError, MediaPolicy
from qwen2vl.processing.video import load_video, preprocess_video, video_token_count
from qwen2vl.processing.vision_config import VisionProcessingConfig
from tests.helpers.video_reference import (
    hf_video_patches,
    make_video,
    qwen_vl_utils_or_skip,
    reading_with_naive_decoder,
    tv_resize,
)

CFG = VisionProcessingConfig()


@pytest.fixture(scope="module")
def qvu():
    return qwen_vl_utils_or_skip()


@pytest.fixture
def reference(qvu, monkeypatch):
    return reading_with_naive_decoder(qvu, monkeypatch)


def painted_index(frames):
    w = frames.shape[-1]
    lo = (frames[:, :, 4:-4, 4: w // 2 - 4].float().mean((1, 2, 3)) / 8).round()
    hi = (frames[:, :, 4:-4, w // 2 + 4: -4].float().mean((1, 2, 3)) / 8).round()
    return (hi * 32 + lo).long().tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_video(d / "a.mp4"),
        "webm": make_video(d / "a.webm", codec="libvpx-vp9"),  # no frame count in the header
        "mkv": make_video(d / "a.mkv", codec="mpeg4"),
        "avi": make_video(d / "a.avi", codec="mpeg4"),
        "mov": make_video(d / "a.mov", codec="mpeg4", n=25, fps=5),
        "long": make_video(d / "long.mp4", n=300, fps=10, gop=10),
    }


SAMPLING = [{}, {"fps": 1.0}, {"fps": 4.5}, {"nframes": 4}, {"nframes": 5}, {"nframes": 7},
            {"fps": 10.0, "max_frames": 10}, {"fps": 0.5, "min_frames": 6},
            {"video_start": 0.55, "video_end": 2.0}, {"video_start": 1.0}, {"video_end": 1.5, "nframes": 6}]


@pytest.mark.parametrize("clip", ["mp4", "webm", "mkv", "avi", "mov"])
@pytest.mark.parametrize("options", SAMPLING, ids=[str(o) for o in SAMPLING])
def test_sampled_frames_match_qwen_vl_utils(reference, clips, clip, options):
    ref_video, meta, ref_fps = reference._read_video_decord({"video": clips[clip], **options})
    frames, sample_fps = load_video(clips[clip], **options)
    assert frames.dtype == torch.uint8 and frames.shape == ref_video.shape
    assert torch.equal(frames, ref_video)
    assert sample_fps == pytest.approx(ref_fps)
    assert painted_index(frames) == list(meta["frames_indices"])


# (options, most frames that may be decoded of the 300): keyframes every 10 frames, so a seek costs
# at most 10 extra frames; dense runs are decoded in order and decoding stops after the last one.
SEEKS = [({"video_start": 15.0, "video_end": 16.0}, 25), ({"video_start": 21.3}, 100), ({"nframes": 8}, 90),
         ({"fps": 0.3}, 90), ({"video_start": 5.0, "video_end": 25.0}, 215)]


@pytest.mark.parametrize("options,most", SEEKS, ids=[str(o) for o, _ in SEEKS])
def test_seeking_decodes_little_and_picks_the_same_frames(reference, clips, monkeypatch, options, most):
    monkeypatch.setattr(video_mod, "SEEK_GAP_S", 1.5)  # a 30 s clip; real gap is 10 s
    decoded, real_open = [0], video_mod.open_video

    class Counting:
        def __init__(self, data):
            self.container = real_open(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded[0] += 1
                yield frame

    monkeypatch.setattr(video_mod, "open_video", Counting)
    ref_video, meta, ref_fps = reference._read_video_decord({"video": clips["long"], **options})
    frames, sample_fps = load_video(clips["long"], **options)
    assert torch.equal(frames, ref_video) and sample_fps == pytest.approx(ref_fps)
    assert painted_index(frames) == list(meta["frames_indices"])
    assert decoded[0] <= most, decoded[0]


SIZING = [{}, {"min_pixels": 28 * 28 * 4}, {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 6},
          {"total_pixels": 28 * 28 * 40}, {"total_pixels": 28 * 28 * 40, "min_pixels": 28 * 28 * 2},
          {"resized_height": 100, "resized_width": 60}, {"nframes": 4, "max_pixels": 28 * 28 * 200},
          {"fps": 4.0, "min_pixels": 28 * 28 * 8}, {"max_pixels": 10**9}]


@pytest.mark.parametrize("options", SIZING, ids=[str(o) for o in SIZING])
def test_pixel_values_match_qwen_vl_utils_then_transformers(reference, clips, options):
    ref_video, ref_fps = reference.fetch_video({"video": clips["mp4"], **options}, return_video_sample_fps=True)
    ref_pv, ref_grid = hf_video_patches(ref_video)
    load_opts = {k: v for k, v in options.items() if k in ("fps", "nframes")}
    frames, sample_fps = load_video(clips["mp4"], **load_opts)
    pv, grid = preprocess_video(frames, CFG, **{k: v for k, v in options.items() if k not in load_opts})
    assert grid == ref_grid and sample_fps == pytest.approx(ref_fps)
    assert pv.dtype == torch.float32 and pv.shape == ref_pv.shape
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)
    counted = video_token_count(48, 64, CFG, total_frames=30, video_fps=10.0, **options)
    assert counted.grid_thw == grid and counted.num_tokens == grid[0] * grid[1] * grid[2] // 4


def test_frame_list_is_used_as_given_and_odd_counts_repeat_the_last_frame(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(arrays[1]).save(tmp_path / "f1.png")
    frames, fps = load_video([Image.fromarray(arrays[0]), str(tmp_path / "f1.png"), Image.fromarray(arrays[2])])
    assert fps == 2.0 and torch.equal(frames, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    options = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 9}
    pv, grid = preprocess_video(frames, CFG, **options)
    h, w = grid[1] * 14, grid[2] * 14
    ref_pv, ref_grid = hf_video_patches(tv_resize(frames, (h, w)))
    assert grid == ref_grid == (2, h // 14, w // 14)
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)
    assert video_token_count(50, 70, CFG, num_frames=3, **options).grid_thw == grid
    assert load_video([Image.fromarray(arrays[0])] * 2, fps=4.0)[1] == 4.0


@pytest.mark.parametrize("as_paths", [False, True])
def test_frame_list_matches_qwen_vl_utils(reference, tmp_path, as_paths):
    """qwen-vl-utils' list-of-frames path: each frame through fetch_image, the last repeated to an even
    count, then the video resize. Its fetch_image gets 28 as the patch size there, so it first
    rounds each frame to multiples of 56; we resize once, as transformers' video processor does a
    list of frames (test above). On frames whose sides are multiples of 56 the two agree exactly."""
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (56, 112, 3), dtype=np.uint8)) for _ in range(5)]
    frames = images
    if as_paths:
        frames = [str(tmp_path / f"f{i}.png") for i in range(5)]
        for image, path in zip(images, frames):
            image.save(path)
    options = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 8}
    ref_video = reference.fetch_video({"video": frames, **options})
    ref_pv, ref_grid = hf_video_patches(ref_video)
    pv, grid = preprocess_video(load_video(frames)[0], CFG, **options)
    assert grid == ref_grid == (3, 4, 8)
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)


def test_bad_requests_and_limits_raise_clear_errors(clips, tmp_path):
    with pytest.raises(ValueError, match="either fps or nframes"):
        load_video(clips["mp4"], fps=2.0, nframes=4)
    with pytest.raises(ValueError, match="select no frames"):
        load_video(clips["mp4"], video_start=2.0, video_end=1.0)
    with pytest.raises(ValueError, match="between 2 and 30"):
        load_video(clips["mp4"], nframes=40)
    with pytest.raises(MediaError, match="max_video_frames"):
        load_video(clips["mp4"], MediaPolicy(max_video_frames=4), nframes=6)
    with pytest.raises(MediaError, match="max_video_seconds"):
        load_video(clips["mp4"], MediaPolicy(max_video_seconds=2.0))
    with pytest.raises(MediaError, match="max_video_seconds"):
        load_video(clips["webm"], MediaPolicy(max_video_seconds=2.0))
    with pytest.raises(MediaError, match="over the limit"):
        load_video(clips["mp4"], MediaPolicy(max_video_bytes=100))
    with pytest.raises(MediaError, match="max_image_pixels"):
        load_video(clips["mp4"], MediaPolicy(max_image_pixels=1000))
    with open(clips["mp4"], "rb") as f:
        data = f.read()
    assert load_video(data, nframes=4)[0].shape == (4, 3, 48, 64)
    for broken in (b"", b"garbage" * 100, data[: len(data) // 3]):
        with pytest.raises(MediaError):
            load_video(broken)
    with pytest.raises(ValueError, match="one size"):
        load_video([Image.new("RGB", (30, 30)), Image.new("RGB", (31, 30))])
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(torch.zeros(2, 3, 28, 28), CFG)


def clip_that_changes_size(sizes=((64, 48),) * 4 + ((32, 24),) * 4, fps=4) -> bytes:
    """An MJPEG clip (each packet a whole JPEG) whose frames have the given (width, height)s: a stream
    whose resolution changes midway, as a recorder switching cameras writes."""

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("mjpeg", rate=fps)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuvj420p"
        encoders = {}
        for i, (w, h) in enumerate(sizes):
            if (w, h) not in encoders:
                ctx = av.CodecContext.create("mjpeg", "w")
                ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = w, h, "yuvj420p", Fraction(1, fps)
                encoders[w, h] = ctx
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), format="rgb24")
            frame = frame.reformat(format="yuvj420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in encoders[w, h].encode(frame):
                packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, fps)
                out.mux(packet)
    return buf.getvalue()


def test_frames_of_another_size_are_resized_to_the_first_ones():
    data = clip_that_changes_size()
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert [f.shape for f in decoded] == [(48, 64, 3)] * 4 + [(24, 32, 3)] * 4
    frames, _ = load_video(data, nframes=8)
    assert frames.shape == (8, 3, 48, 64)
    assert torch.equal(frames[:4], torch.from_numpy(np.stack(decoded[:4])).permute(0, 3, 1, 2))
    small = torch.from_numpy(np.stack(decoded[4:])).permute(0, 3, 1, 2)
    assert torch.equal(frames[4:], tv_resize(small, (48, 64)))  # torchvision's bicubic, as the frames' resize
    pixels, grid = preprocess_video(frames, CFG)
    assert grid[0] == 4 and pixels.shape[0] == grid[0] * grid[1] * grid[2]
