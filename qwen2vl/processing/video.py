"""Videos to pixel patches: decode only the sampled frames with PyAV, resize, normalize, patchify.

Sampling and sizing follow qwen-vl-utils (vision_process.py), which is how the Qwen team feeds
videos: `nframes` frames (or `fps` per second, within [min_frames, max_frames]), an even count,
at linspace(start, end, n).round() indices; each frame's pixel budget is its share of
`total_pixels` for the whole video, kept within [video_min_pixels*1.05, video_max_pixels]. The
resize is torchvision's tensor bicubic with antialias, rounded back to uint8. Normalization and
patchify are shared with images (image.py): a video is a grid with t = frames / 2.

Frames are decoded in order and converted only when kept; decoding stops after the last sampled
frame, and it seeks when the next one is more than SEEK_GAP_S seconds ahead (video_start too).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from .headers import DECODE_ERRORS, check_seconds, open_video, video_header
from .image import VisionTokens, _tokens, load_image, normalize, patchify, smart_resize
from .media import MediaError, MediaPolicy, open_source
from .vision_config import VisionProcessingConfig

SEEK_GAP_S = 10.0  # about the longest keyframe interval in practice; a shorter seek lands behind us


def frame_range(total_frames: int, video_fps: float, video_start=None, video_end=None) -> tuple[int, int]:
    """First and last frame index inside [video_start, video_end] seconds (qwen-vl-utils rule)."""
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    start = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(f"video_start={video_start} / video_end={video_end} select no frames of a "
                         f"{duration:.2f} s video ({total_frames} frames at {video_fps:g} fps)")
    return start, end


def sample_frames(total_frames: int, video_fps: float, cfg: VisionProcessingConfig, *, fps=None, nframes=None,
                  min_frames=None, max_frames=None, video_start=None, video_end=None) -> tuple[list[int], float]:
    """Indices of the frames to keep and the resulting frames per second (qwen-vl-utils'
    calculate_video_frame_range + smart_nframes + linspace)."""
    if fps is not None and nframes is not None:
        raise ValueError("give either fps or nframes for a video, not both")
    if total_frames < 1 or not video_fps > 0:
        raise MediaError(f"video has {total_frames} frames at {video_fps} fps: nothing to sample")
    step = cfg.temporal_patch_size  # frames go to the model in pairs
    start, end = frame_range(total_frames, video_fps, video_start, video_end)
    total = end - start + 1
    if nframes is not None:
        n = round(nframes / step) * step
    else:
        fps = cfg.fps if fps is None else fps
        lo = math.ceil((cfg.min_frames if min_frames is None else min_frames) / step) * step
        hi = math.floor((min(cfg.max_frames, total) if max_frames is None else max_frames) / step) * step
        n = math.floor(min(max(total / video_fps * fps, lo), hi, total) / step) * step
    if not step <= n <= total:
        raise ValueError(f"a video sample needs between {step} and {total} frames (the frames in range), "
                         f"got {n}; lower nframes/fps/min_frames or widen video_start/video_end")
    indices = torch.linspace(start, end, n).round().long().tolist()
    return indices, n / total * video_fps


def video_size(height: int, width: int, num_frames: int, cfg: VisionProcessingConfig, *, min_pixels=None,
               max_pixels=None, total_pixels=None, resized_height=None, resized_width=None) -> tuple[int, int]:
    """(height, width) every frame is resized to; `num_frames` as fed to the model (even)."""
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None:
        return smart_resize(resized_height, resized_width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    min_pixels = cfg.video_min_pixels if min_pixels is None else min_pixels
    total_pixels = cfg.video_total_pixels if total_pixels is None else total_pixels
    cap = max(min(cfg.video_max_pixels, total_pixels / num_frames * cfg.temporal_patch_size),
              int(min_pixels * 1.05))
    max_pixels = cap if max_pixels is None else min(max_pixels, cap)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels for a video, got {min_pixels} and {max_pixels}")
    return smart_resize(height, width, cfg.factor, min_pixels, max_pixels)


def video_token_count(height: int, width: int, cfg: VisionProcessingConfig, *, num_frames=None,
                      total_frames=None, video_fps=None, fps=None, nframes=None, min_frames=None,
                      max_frames=None, video_start=None, video_end=None, **size_options) -> VisionTokens:
    """Resized size, grid and LLM tokens of a video without decoding it: give `num_frames` for a
    list of frames, or `total_frames` and `video_fps` of a file to apply the sampling rules."""
    if num_frames is None:
        if total_frames is None or video_fps is None:
            raise ValueError("video_token_count needs num_frames, or total_frames and video_fps")
        num_frames = len(sample_frames(total_frames, video_fps, cfg, fps=fps, nframes=nframes,
                                       min_frames=min_frames, max_frames=max_frames,
                                       video_start=video_start, video_end=video_end)[0])
    step = cfg.temporal_patch_size
    num_frames = -(-num_frames // step) * step
    h, w = video_size(height, width, num_frames, cfg, **size_options)
    return _tokens(h, w, num_frames // step, cfg)


def load_video(source, policy: MediaPolicy | None = None, *, fps=None, nframes=None, min_frames=None,
               max_frames=None, video_start=None, video_end=None, sample_fps=None,
               cfg: VisionProcessingConfig | None = None) -> tuple[torch.Tensor, float]:
    """Sampled frames as uint8 [T, 3, H, W] and their rate in frames per second.

    `source` is a video file (path, file:// or http(s) URL, data: URI, bytes) or a list of
    frames (each anything `load_image` takes), used as given at `sample_fps` (qwen-vl-utils'
    name) or `fps` per second, default 2."""
    policy, cfg = policy or MediaPolicy(), cfg or VisionProcessingConfig()
    if isinstance(source, (list, tuple)):
        if nframes is not None or video_start is not None or video_end is not None:
            raise ValueError("nframes, video_start and video_end apply to video files, not frame lists")
        rate = sample_fps if sample_fps is not None else cfg.fps if fps is None else fps
        if not rate > 0:
            raise ValueError(f"a frame list's rate must be > 0 frames per second, got {rate}")
        return _frames_from_list(source, policy), float(rate)
    if sample_fps is not None:
        raise ValueError("sample_fps is the rate of a list of frames; for a video file give fps")
    data = open_source(source, policy, max_bytes=policy.max_video_bytes, what="video")
    header = video_header(data, "video", max_pixels=policy.max_image_pixels, max_seconds=policy.max_video_seconds)
    check_seconds(header.seconds, policy.max_video_seconds)  # the container may not state its duration
    indices, sample_fps = sample_frames(header.frames, header.fps, cfg, fps=fps, nframes=nframes,
                                        min_frames=min_frames, max_frames=max_frames,
                                        video_start=video_start, video_end=video_end)
    if len(indices) > policy.max_video_frames:
        raise MediaError(f"{len(indices)} video frames requested, over the limit of "
                         f"{policy.max_video_frames} (MediaPolicy.max_video_frames)")
    try:
        with open_video(data) as container:
            frames = _decode(container, indices, header.fps)
    except DECODE_ERRORS as e:
        raise MediaError(f"video could not be decoded: {type(e).__name__}: {e}") from None
    return _one_size(frames), sample_fps


def _one_size(frames: list[np.ndarray]) -> torch.Tensor:
    """RGB frames [H, W, 3] -> uint8 [T, 3, H, W] at the first frame's size. A stream may change its
    resolution midway (a recorder switching cameras); a frame of another size is resized to the
    first's, as qwen-vl-utils' readers return every frame at one size, with the same resize as
    preprocess_video's."""
    h, w = frames[0].shape[:2]
    out = torch.empty(len(frames), 3, h, w, dtype=torch.uint8)
    for i, frame in enumerate(frames):
        pixels = torch.from_numpy(frame).permute(2, 0, 1)
        out[i] = pixels if frame.shape[:2] == (h, w) else _resize(pixels[None], h, w)[0]
    return out


def _frames_from_list(items, policy: MediaPolicy) -> torch.Tensor:
    if not items:
        raise ValueError("a video given as a list of frames needs at least one frame")
    if len(items) > policy.max_video_frames:
        raise MediaError(f"video has {len(items)} frames, over the limit of {policy.max_video_frames} "
                         "(MediaPolicy.max_video_frames)")
    frames = [np.asarray(load_image(item, policy)) for item in items]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted(s[1::-1] for s in sizes)}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


def _decode(container, indices: list[int], video_fps: float) -> list[np.ndarray]:
    """RGB arrays [H, W, 3] of the frames at `indices` (sorted), decoding as little as possible.

    A frame's index comes from its timestamp, so it is right after a seek too; if a wanted frame
    is missing (a timestamp gap), the next decoded frame stands in for it, and if the file ends
    early (a header that overcounts), the last decoded frame does."""
    stream = container.streams.video[0]
    tb, start = float(stream.time_base), stream.start_time or 0
    gap = max(1, round(SEEK_GAP_S * video_fps))
    frames, decoded = [], None
    position, current, rgb = -1, None, None  # index of the last decoded frame, the frame, its pixels

    def index_of(frame, previous: int) -> int:
        return previous + 1 if frame.pts is None else round((frame.pts - start) * tb * video_fps)

    for target in indices:
        if decoded is None or target - position > gap:
            if target > gap:
                container.seek(start + int(target / video_fps / tb), stream=stream, backward=True)
            decoded = container.decode(stream)
        while position < target and (frame := next(decoded, None)) is not None:
            position, current, rgb = index_of(frame, position), frame, None
        if current is None:
            raise MediaError("video has no decodable frames")
        if rgb is None:  # convert only frames we keep, once
            rgb = current.to_ndarray(format="rgb24")
        frames.append(rgb)
    return frames


def preprocess_video(frames: torch.Tensor, cfg: VisionProcessingConfig, *, min_pixels=None, max_pixels=None,
                     total_pixels=None, resized_height=None,
                     resized_width=None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, 3, H, W] -> (pixel_values [t*h*w, 1176] float32, grid_thw (t, h, w)),
    t = ceil(T / 2): an odd last frame is repeated, as qwen-vl-utils and transformers do."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"video frames must be uint8 [T, 3, H, W] with T >= 1, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if pad := -frames.shape[0] % cfg.temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    T, _, H, W = frames.shape
    h, w = video_size(H, W, T, cfg, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                      resized_height=resized_height, resized_width=resized_width)
    if (h, w) != (H, W):
        frames = torch.cat([_resize(chunk, h, w) for chunk in frames.split(8)])  # bounded float32 copies
    return patchify(normalize(frames, cfg), cfg), (T // cfg.temporal_patch_size, h // cfg.patch_size,
                                                   w // cfg.patch_size)


def _resize(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """torchvision's resize of a uint8 tensor, BICUBIC with antialias: float32, clamp, round."""
    x = F.interpolate(frames.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8)
