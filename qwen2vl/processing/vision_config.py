"""Image and video processing settings, read from a checkpoint's `preprocessor_config.json`.

Image settings come from the checkpoint (the hub file, or the `size` dict transformers 5 writes).
Video settings are the qwen-vl-utils constants (vision_process.py): the hub checkpoints ship no
video config, and qwen-vl-utils is the pipeline the Qwen team documents for video.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

# What the published Qwen2-VL-*-Instruct preprocessor_config.json says (REFERENCE.md §3.2); used
# when a folder has no such file. (transformers' code defaults differ: max_pixels 28*28*1280.)
HUB_MIN_PIXELS = 4 * 28 * 28  # 3136 = 56*56
HUB_MAX_PIXELS = 16384 * 28 * 28  # 12,845,056
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionProcessingConfig:
    min_pixels: int = HUB_MIN_PIXELS  # per image, after resizing
    max_pixels: int = HUB_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2  # also qwen-vl-utils' FRAME_FACTOR: frames go in pairs
    merge_size: int = 2  # 2x2 patches become one LLM token
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    # Video budget per frame (qwen-vl-utils VIDEO_MIN/MAX_TOKEN_NUM * 28 * 28) and for the whole
    # clip (90% of a 128k-token context): the per-frame cap shrinks as the frame count grows.
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    video_total_pixels: int = int(128000 * 28 * 28 * 0.9)
    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise ValueError(f"patch sizes must be positive, got {self}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (RGB)")
        for what, lo, hi in (("image", self.min_pixels, self.max_pixels),
                             ("video", self.video_min_pixels, self.video_max_pixels)):
            if not 0 < lo <= hi:
                raise ValueError(f"{what} pixel budget needs 0 < min_pixels <= max_pixels, got {lo} and {hi}")
        if not (self.fps > 0 and 0 < self.min_frames <= self.max_frames):
            raise ValueError(f"video sampling needs fps > 0 and 0 < min_frames <= max_frames, got "
                             f"{self.fps}, {self.min_frames}, {self.max_frames}")

    @property
    def factor(self) -> int:
        """Side of one LLM token in pixels (28): resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one row of pixel_values: 3 * 2 * 14 * 14 = 1176."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionProcessingConfig":
        """Known keys are read; unknown keys (do_resize, processor_class, ...) are ignored.

        transformers 5 writes `size: {shortest_edge, longest_edge}` instead of min/max_pixels;
        as in Qwen2VLImageProcessor.__init__, explicit min_pixels/max_pixels win over `size`.
        """
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        size = d.get("size") or {}
        if "min_pixels" not in kwargs and size.get("shortest_edge") is not None:
            kwargs["min_pixels"] = size["shortest_edge"]
        if "max_pixels" not in kwargs and size.get("longest_edge") is not None:
            kwargs["max_pixels"] = size["longest_edge"]
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(float(x) for x in (value if isinstance(value, (list, tuple)) else [value] * 3))
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "VisionProcessingConfig":
        """Read `folder/preprocessor_config.json` (or that file itself); the published defaults
        when the folder has none."""
        path = Path(folder)
        if not path.exists():
            raise FileNotFoundError(f"no such model folder: {path}")
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)
