"""Grounded answers: parse Qwen2-VL's box and quad markup into pixel regions, and draw them.

Asked "where is the dog?", Qwen2-VL answers with special tokens around a label and its box:

    <|object_ref_start|>the dog<|object_ref_end|><|box_start|>(120,340),(560,910)<|box_end|>

Coordinates are integers on a 0-1000 scale of the image's width and height (Qwen2-VL, not
Qwen2.5-VL, which uses absolute pixels), so they map to the original image by x * width / 1000
whatever size the processor resized it to. A label may be followed by several boxes; a box may
come without a label; `<|quad_start|>(x1,y1),(x2,y2),(x3,y3),(x4,y4)<|quad_end|>` gives four
corners (text lines in OCR answers). The markup survives only if the answer is decoded with
`skip_special_tokens=False`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
QUAD_START, QUAD_END = "<|quad_start|>", "<|quad_end|>"
SCALE = 1000  # Qwen2-VL's coordinate range

_POINT = r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)"
_POINTS = re.compile(_POINT)
# One piece of markup: a label, a box or a quad; labels stay in force for the regions after them.
_MARKUP = re.compile(
    re.escape(REF_START) + r"(?P<label>.*?)" + re.escape(REF_END)
    + "|" + re.escape(BOX_START) + rf"\s*(?P<box>{_POINT}\s*,\s*{_POINT})\s*" + re.escape(BOX_END)
    + "|" + re.escape(QUAD_START) + rf"\s*(?P<quad>{_POINT}(?:\s*,\s*{_POINT}){{3}})\s*" + re.escape(QUAD_END),
    re.DOTALL,
)
_ANY_MARKUP = re.compile("|".join(map(re.escape, (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END))))


@dataclass(frozen=True)
class Region:
    """A grounded region in pixels of the original image: a box (2 corners) or a quad (4)."""

    label: str | None
    points: tuple[tuple[int, int], ...]  # box: (x1, y1), (x2, y2) with x1 <= x2, y1 <= y2

    @property
    def kind(self) -> str:
        return "box" if len(self.points) == 2 else "quad"

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x1, y1, x2, y2) around the region."""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)

    def to_dict(self) -> dict:
        """JSON form, e.g. for a server response: {"label", "type", "box" or "points"}."""
        out = {"label": self.label, "type": self.kind}
        if self.kind == "box":
            out["box"] = list(self.bbox)
        else:
            out["points"] = [list(p) for p in self.points]
        return out


def parse_grounding(text: str, width: int = SCALE, height: int = SCALE) -> list[Region]:
    """Boxes and quads in `text`, scaled from 0-1000 to a `width` x `height` image.

    Malformed markup (missing end token, wrong number of points, non-numbers) is skipped, not
    guessed at; coordinates outside 0-1000 are clamped. A label applies to the boxes right after
    it, up to the next label.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    regions, label = [], None
    for m in _MARKUP.finditer(text):
        if m.group("label") is not None:
            label = m.group("label").strip() or None
            continue
        raw = [(float(x), float(y)) for x, y in _POINTS.findall(m.group("box") or m.group("quad"))]
        points = [(_scale(x, width), _scale(y, height)) for x, y in raw]
        if m.group("box") is not None:  # corners in either order -> top-left, bottom-right
            (xa, ya), (xb, yb) = points
            points = [(min(xa, xb), min(ya, yb)), (max(xa, xb), max(ya, yb))]
        regions.append(Region(label, tuple(points)))
    return regions


def _scale(v: float, size: int) -> int:
    return round(min(max(v, 0.0), SCALE) * size / SCALE)


def strip_grounding(text: str) -> str:
    """The answer for reading: labels kept as plain text, box and quad coordinates removed."""
    text = re.sub(re.escape(BOX_START) + r".*?" + re.escape(BOX_END), "", text, flags=re.DOTALL)
    text = re.sub(re.escape(QUAD_START) + r".*?" + re.escape(QUAD_END), "", text, flags=re.DOTALL)
    return _ANY_MARKUP.sub("", text)


def drop_markup(text: str) -> str:
    """The answer with the grounding tokens removed, labels and coordinates kept as plain text:
    what to send back as chat history, since a server refuses special tokens inside messages."""
    return _ANY_MARKUP.sub("", text)


COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def draw_regions(image: Image.Image, regions: list[Region]) -> Image.Image:
    """A copy of `image` with each region outlined and labelled (one colour per label)."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, out.height // 40))
    width = max(2, round(min(out.size) / 200))
    colors: dict[str | None, str] = {}
    for region in regions:
        color = colors.setdefault(region.label, COLORS[len(colors) % len(COLORS)])
        if region.kind == "box":
            draw.rectangle(region.bbox, outline=color, width=width)
        else:
            draw.polygon(region.points, outline=color, width=width)
        if region.label:
            x1, y1, _, _ = region.bbox
            l0, t0, r0, b0 = draw.textbbox((0, 0), region.label, font=font)
            w, h = r0 - l0 + 2 * width, b0 - t0 + 2 * width
            top = y1 - h if y1 >= h else y1  # above the region if there is room, else inside it
            draw.rectangle((x1, top, x1 + w, top + h), fill=color)
            draw.text((x1 + width - l0, top + width - t0), region.label, fill="white", font=font)
    return out
