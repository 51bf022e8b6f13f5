"""Scenes of the demo suite: coloured shapes (and a word) on a plain background.

Every shape sits in its own square, which is also its answer box for grounding: a circle fills the
square, a square is the square, a triangle is the regular triangle inscribed in the square's circle
(apex on the top edge). Squares are 12-25% of the image's shorter side (at least 16 px) and no two
are closer than GAP px, so shapes never touch and can always be counted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
    "yellow": (255, 225, 25), "purple": (145, 30, 180), "orange": (245, 130, 48),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIDE, MAX_SIDE = 112, 448  # image width and height
MIN_SHAPE = 16  # px: the smallest shape square
SHAPE_FRACTION = (0.12, 0.25)  # of the image's shorter side
GAP = 4  # px between any two squares (and between a square and the word)
BACKGROUND = (200, 255)  # each RGB channel of the background
TEXT_COLOR = (0, 0, 0)
FONT_SIZES = (18, 40)
WORD_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # a key of COLORS
    x: int  # top-left corner of the shape's square, px
    y: int
    side: int  # px

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The square as (x1, y1, x2, y2), x2/y2 exclusive."""
        return self.x, self.y, self.x + self.side, self.y + self.side

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


def box_1000(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box on Qwen2-VL's 0-1000 scale of width and height (grounding.py's convention)."""
    x1, y1, x2, y2 = box
    return (round(x1 * 1000 / width), round(y1 * 1000 / height), round(x2 * 1000 / width), round(y2 * 1000 / height))


def apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = GAP) -> bool:
    """True when boxes a and b (x2/y2 exclusive) are at least `gap` px apart on some axis."""
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def shape_sides(width: int, height: int, fraction: tuple[float, float] = SHAPE_FRACTION) -> tuple[int, int]:
    """Smallest and largest square side for an image of this size: `fraction` of its shorter side."""
    short = min(width, height)
    return max(MIN_SHAPE, math.ceil(fraction[0] * short)), max(MIN_SHAPE, int(fraction[1] * short))


def random_size(rng: random.Random, lo: int = MIN_SIDE, hi: int = MAX_SIDE) -> tuple[int, int]:
    return rng.randint(lo, hi), rng.randint(lo, hi)


def random_background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(*BACKGROUND) for _ in range(3))


def place(rng: random.Random, width: int, height: int, specs: list[tuple[str, str]],
          keep_out: list[tuple[int, int, int, int]] = (), tries: int = 200,
          fraction: tuple[float, float] | None = None) -> list[Shape] | None:
    """Shapes of the given (kind, color) at random sizes and places, every square at least GAP px from
    the others and from the `keep_out` boxes; None when they do not fit after `tries` attempts.
    `fraction`: square sides as this share of the shorter side instead of the suite's (training lessons)."""
    lo, hi = shape_sides(width, height, fraction or SHAPE_FRACTION)
    for _ in range(tries):
        shapes: list[Shape] = []
        for kind, color in specs:
            side = rng.randint(lo, hi)
            for _ in range(50):
                s = Shape(kind, color, rng.randint(0, width - side), rng.randint(0, height - side), side)
                if all(apart(s.box, o) for o in [*keep_out, *(t.box for t in shapes)]):
                    shapes.append(s)
                    break
            else:
                break
        if len(shapes) == len(specs):
            return shapes
    return None


def fit(rng: random.Random, specs: list[tuple[str, str]], fraction: tuple[float, float] | None = None,
        side: int | None = None) -> tuple[int, int, list[Shape]]:
    """A random picture size (`side` x `side` when given) and `specs` placed in it (`place`), the size drawn
    again until they fit."""
    while True:
        width, height = (side, side) if side else random_size(rng)
        shapes = place(rng, width, height, specs, fraction=fraction)
        if shapes is not None:
            return width, height, shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x, y, s, fill = shape.x, shape.y, shape.side, COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x, y, x + s - 1, y + s - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x, y, x + s - 1, y + s - 1), fill=fill)
    else:  # apex up, inscribed in the square's circle
        draw.regular_polygon((x + s / 2, y + s / 2, s / 2), 3, fill=fill)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def random_word(rng: random.Random, letters: tuple[int, int]) -> str:
    """A word of `letters` (lo-hi) characters from WORD_CHARS."""
    return "".join(rng.choice(WORD_CHARS) for _ in range(rng.randint(*letters)))


def fits(box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """Whether a box (a word's text_box) is no wider and no taller than width x height."""
    left, top, right, bottom = box
    return right - left <= width and bottom - top <= height


def text_box(word: str, size: int, x: int, y: int) -> tuple[int, int, int, int]:
    """Pixels the word covers when drawn at (x, y) (x2/y2 exclusive)."""
    left, top, right, bottom = font(size).getbbox(word)
    return x + left, y + top, x + right, y + bottom


STRIP_HEIGHT = 56  # px: two rows of merged tokens, the suite's largest font with room to move


def strip(rng: random.Random, word: str, size: int) -> tuple[Image.Image, int, int]:
    """`word` at font `size` in black on a picture just big enough for it: (the picture, x, y it was drawn at).
    STRIP_HEIGHT tall and a multiple of 28 px wide (the merged token) with 0-1 token to spare, so that the
    processor keeps the glyphs' size and a picture is 4-16 merged tokens (8 most often) where the suite's average
    is ~100: a reading lesson's rows cost a tenth of the suite's (docs/demo.md, "Reading on strips")."""
    left, top, right, bottom = text_box(word, size, 0, 0)
    # at least STRIP_HEIGHT wide: the demo's min_pixels (56 x 56) would scale a smaller picture up
    width = max(STRIP_HEIGHT, -(-(right - left + 6) // 28) * 28 + 28 * rng.randint(0, 1))
    x, y = rng.randint(-left, width - right), rng.randint(-top, STRIP_HEIGHT - bottom)
    return draw_scene(width, STRIP_HEIGHT, random_background(rng), [], word=(word, size, x, y)), x, y


def draw_scene(width: int, height: int, background, shapes: list[Shape],
               word: tuple[str, int, int, int] | None = None) -> Image.Image:
    """An RGB image with the shapes and, optionally, `word` = (text, font size, x, y) in black."""
    image = Image.new("RGB", (width, height), tuple(background))
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    if word is not None:
        text, size, x, y = word
        draw.text((x, y), text, fill=TEXT_COLOR, font=font(size))
    return image
