"""Images to pixel patches: load with limits, convert to RGB, smart_resize, normalize, patchify.

Numerics follow transformers' Qwen2VLImageProcessorPil bit for bit: PIL bicubic resize of the
uint8 RGB image, x/255 in float64 rounded to float32, (x - mean) / std in float32. That is also
what the official pipeline (qwen-vl-utils' fetch_image, then the HF processor) computes: both
resize once with PIL bicubic to the same size, except for sides under 14 px, where qwen-vl-utils
rounds up to 28 before applying min_pixels and HF does not; we follow HF.

Choices where the references are silent or odd (see `to_rgb`): transparency is composited on
white like HF; 16-bit grayscale is scaled to 8 bits (>> 8) where both references clip every
value above 255 to white; EXIF orientation is applied when we decode a file (as transformers'
load_image does), never to a PIL image the caller hands us.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .headers import open_image, seen_size
from .media import MediaError, MediaPolicy, open_source
from .vision_config import VisionProcessingConfig

MAX_ASPECT_RATIO = 200


class VisionTokens(NamedTuple):
    """What an image or video costs, known without decoding pixels."""

    height: int  # after resizing
    width: int
    grid_thw: tuple[int, int, int]  # in 14-px patches (t in pairs of frames)
    num_tokens: int  # <|image_pad|> / <|video_pad|> tokens in the prompt: t*h*w / merge**2


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Sides that are multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    REFERENCE.md §3.1; the same arithmetic as transformers' smart_resize (including an image
    under 14 px on a side rounding to 0 and so taking the min_pixels branch)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_size(height: int, width: int, cfg: VisionProcessingConfig, *, min_pixels=None, max_pixels=None,
               resized_height=None, resized_width=None) -> tuple[int, int]:
    """The (height, width) an image is resized to, per-item options over the config."""
    min_pixels = cfg.min_pixels if min_pixels is None else min_pixels
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    if (resized_height is None) != (resized_width is None):
        raise ValueError("give both resized_height and resized_width, or neither")
    if resized_height is not None:
        # As qwen-vl-utils: the requested size is itself snapped by smart_resize.
        return smart_resize(resized_height, resized_width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return smart_resize(height, width, cfg.factor, min_pixels, max_pixels)


def image_token_count(height: int, width: int, cfg: VisionProcessingConfig, **options) -> VisionTokens:
    """Resized size, grid and LLM token count of a `width` x `height` image; options as
    `preprocess_image`."""
    h, w = image_size(height, width, cfg, **options)
    return _tokens(h, w, 1, cfg)


def _tokens(h: int, w: int, grid_t: int, cfg: VisionProcessingConfig) -> VisionTokens:
    grid = (grid_t, h // cfg.patch_size, w // cfg.patch_size)
    return VisionTokens(h, w, grid, grid[0] * grid[1] * grid[2] // cfg.merge_size**2)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Alpha (or palette transparency) is composited on white, as transformers'
    convert_to_rgb does; 16-bit grayscale keeps its top 8 bits instead of being clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), mode="L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source, policy: MediaPolicy | None = None) -> Image.Image:
    """An RGB PIL image from a path, file:// or http(s) URL, data: URI, bytes or PIL image.

    The pixel count is read from the header and checked before anything is decoded, so a small
    file claiming a huge size (a decompression bomb) is refused cheaply."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    policy = policy or MediaPolicy()
    data = open_source(source, policy, max_bytes=policy.max_image_bytes, what="image")
    with open_image(data) as image:  # the header only, so far
        width, height = seen_size(image)
        if width * height > policy.max_image_pixels:
            raise MediaError(f"image is {width}x{height} = {width * height:,} pixels, over the limit "
                             f"of {policy.max_image_pixels:,} (MediaPolicy.max_image_pixels)")
        try:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise MediaError(f"image could not be decoded: {type(e).__name__}: {e}") from None


def normalize(frames: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float32 (x/255 - mean) / std, rounded as transformers' PIL backend:
    the rescale in float64, then float32 arithmetic."""
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty(frames.shape, dtype=torch.float32)
    for i in range(0, frames.shape[0], 8):  # bounded float64 temporaries for long videos
        x = (frames[i:i + 8].to(torch.float64) * cfg.rescale_factor).to(torch.float32)
        out[i:i + 8] = (x - mean) / std
    return out


def patchify(frames: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """[T, C, H, W] (T a multiple of temporal_patch_size) -> [t*h*w, C*tp*p*p] in the order the
    vision tower expects: rows in merge-window order (the merge x merge patches of one window are
    consecutive, windows raster-ordered, frames pairs outermost); a row is (C, tp, py, px)."""
    T, C, H, W = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    assert T % tp == 0 and H % (p * m) == 0 and W % (p * m) == 0, (frames.shape, p, m, tp)
    x = frames.reshape(T // tp, tp, C, H // (p * m), m, p, W // (p * m), m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, bh, bw, mh, mw, C, tp, py, px]
    return x.reshape(-1, C * tp * p * p)


def preprocess_image(image: Image.Image, cfg: VisionProcessingConfig, *, min_pixels=None, max_pixels=None,
                     resized_height=None, resized_width=None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """PIL image -> (pixel_values [h*w, 1176] float32, grid_thw (1, h, w)); a still image is one
    frame pair (the frame repeated)."""
    image = to_rgb(image)
    width, height = image.size
    size = image_token_count(height, width, cfg, min_pixels=min_pixels, max_pixels=max_pixels,
                             resized_height=resized_height, resized_width=resized_width)
    image = image.resize((size.width, size.height), resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # [3, H, W] uint8
    frames = normalize(pixels[None], cfg).expand(cfg.temporal_patch_size, -1, -1, -1)
    return patchify(frames, cfg), size.grid_thw
