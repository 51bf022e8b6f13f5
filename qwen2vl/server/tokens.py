"""What images and videos cost in tokens, known from their headers alone (no pixel decoding).

Used twice: before a chat request decodes anything (so an image that would overflow the context
is refused cheaply, with a max_pixels that would fit), and by `POST /v1/token_count`, which lets
a client budget a request before sending it:

    POST /v1/token_count {"messages": [...], "mm_processor_kwargs": {"max_pixels": 200704}}
    -> {"prompt_tokens": 1203, "text_tokens": 27, "visual_tokens": 1176, "max_model_len": 32768,
        "items": [{"type": "image", "param": "messages[0].content[0]", "width": 1920, "height": 1080,
                   "resized_width": 588, "resized_height": 336, "grid_thw": [1, 24, 42], "tokens": 252}, ...]}
"""

import io
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from qwen2vl.processing.image import image_token_count
from qwen2vl.processing.media import MediaError
from qwen2vl.processing.video import video_token_count
from qwen2vl.processing.vision_config import VisionProcessingConfig

_SWAP_ORIENTATIONS = {5, 6, 7, 8}  # EXIF rotations by 90 degrees: width and height trade places
_SIZE_OPTIONS = ("min_pixels", "max_pixels", "total_pixels")


@dataclass
class MediaCost:
    kind: str
    param: str  # where the item is in the request, e.g. messages[1].content[0]
    width: int
    height: int
    resized_width: int
    resized_height: int
    grid_thw: tuple[int, int, int]
    tokens: int
    frames: int | None = None  # video: frames in the file
    seconds: float | None = None  # video: its length

    def to_dict(self) -> dict:
        d = {"type": self.kind, "param": self.param, "width": self.width, "height": self.height,
             "resized_width": self.resized_width, "resized_height": self.resized_height,
             "grid_thw": list(self.grid_thw), "tokens": self.tokens}
        if self.frames is not None:
            d["frames"], d["seconds"] = self.frames, round(self.seconds, 3)
        return d


def media_cost(kind: str, data: bytes | Path | list, options: dict, cfg: VisionProcessingConfig,
               param: str) -> MediaCost:
    """Cost of one fetched image/video (a list: a video's frames) under its (already clamped) options;
    MediaError/ValueError for a file whose header can't be read or options that select nothing."""
    if isinstance(data, list):
        return _frame_list_cost(data, options, cfg, param)
    if kind == "image":
        width, height = image_header(data, param)
        t = image_token_count(height, width, cfg, **{k: v for k, v in options.items() if k in _SIZE_OPTIONS[:2]})
        return MediaCost(kind, param, width, height, t.width, t.height, t.grid_thw, t.num_tokens)
    width, height, frames, fps = video_header(data, param)
    sampling = {k: v for k, v in options.items() if k not in _SIZE_OPTIONS}
    sizes = {k: v for k, v in options.items() if k in _SIZE_OPTIONS}
    t = video_token_count(height, width, cfg, total_frames=frames, video_fps=fps, **sampling, **sizes)
    return MediaCost(kind, param, width, height, t.width, t.height, t.grid_thw, t.num_tokens, frames, frames / fps)


def _frame_list_cost(frames: list, options: dict, cfg: VisionProcessingConfig, param: str) -> MediaCost:
    """A video given as its frames: every frame is used, at `fps` (default the config's) per second."""
    sizes = {image_header(f, f"{param}.video[{k}]") for k, f in enumerate(frames)}
    if len(sizes) > 1:
        raise MediaError(f"{param}: all frames of a video must have one size, got {sorted(sizes)}")
    (width, height), = sizes
    t = video_token_count(height, width, cfg, num_frames=len(frames),
                          **{k: v for k, v in options.items() if k in _SIZE_OPTIONS})
    fps = options.get("fps", cfg.fps)
    return MediaCost("video", param, width, height, t.width, t.height, t.grid_thw, t.num_tokens, len(frames),
                     len(frames) / fps)


def image_header(data: bytes | Path, param: str) -> tuple[int, int]:
    """(width, height) as the image will be seen (EXIF rotation applied), reading the header only."""
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
            width, height = im.size
            orientation = _orientation(im.info.get("exif"))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{param}: image refused before decoding: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"{param}: not a readable image ({type(e).__name__})") from None
    if width < 1 or height < 1:
        raise MediaError(f"{param}: image is {width}x{height}")
    return (height, width) if orientation in _SWAP_ORIENTATIONS else (width, height)


def _orientation(exif) -> int | None:
    """EXIF orientation from the header's raw EXIF block. Not `Image.getexif()`: for PNG it decodes
    the whole image to look for EXIF after the pixels, which is what a bomb wants."""
    if not isinstance(exif, (bytes, bytearray)):
        return None
    data = Image.Exif()
    try:
        data.load(bytes(exif))
    except Exception:  # a broken EXIF block only loses the rotation hint
        return None
    return data.get(0x0112)


def video_header(data: bytes | Path, param: str) -> tuple[int, int, int, float]:
    """(width, height, frame count, frames per second) from the container; when the header has no
    frame count (webm, mkv) the packets are counted, which reads but does not decode."""
    try:
        with av.open(str(data) if isinstance(data, Path) else io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError(f"{param}: no video stream in the file")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
            if not frames:
                frames = sum(1 for p in container.demux(stream) if p.size)
    except (av.error.FFmpegError, OSError, EOFError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{param}: not a readable video ({type(e).__name__})") from None
    if not rate or not frames or width < 1 or height < 1:
        raise MediaError(f"{param}: video has no frames, size or frame rate in its header")
    return width, height, frames, float(rate)
