"""What images and videos cost in tokens, known from their headers alone (no pixel decoding).

Used twice: before a chat request decodes anything (so an image that would overflow the context
is refused cheaply, with a max_pixels that would fit), and by `POST /v1/token_count`, which lets
a client budget a request before sending it:

    POST /v1/token_count {"messages": [...], "mm_processor_kwargs": {"max_pixels": 200704}}
    -> {"prompt_tokens": 1203, "text_tokens": 27, "visual_tokens": 1176, "max_model_len": 32768,
        "items": [{"type": "image", "param": "messages[0].content[0]", "width": 1920, "height": 1080,
                   "resized_width": 588, "resized_height": 336, "grid_thw": [1, 24, 42], "tokens": 252}, ...]}
"""

from dataclasses import dataclass
from pathlib import Path

from qwen2vl.processing.headers import image_header, video_header
from qwen2vl.processing.image import image_token_count
from qwen2vl.processing.media import MediaError
from qwen2vl.processing.video import video_token_count
from qwen2vl.processing.vision_config import VisionProcessingConfig

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
    video = video_header(data, param)
    sampling = {k: v for k, v in options.items() if k not in _SIZE_OPTIONS}
    sizes = {k: v for k, v in options.items() if k in _SIZE_OPTIONS}
    t = video_token_count(video.height, video.width, cfg, total_frames=video.frames, video_fps=video.fps,
                          **sampling, **sizes)
    return MediaCost(kind, param, video.width, video.height, t.width, t.height, t.grid_thw, t.num_tokens,
                     video.frames, video.seconds)


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
