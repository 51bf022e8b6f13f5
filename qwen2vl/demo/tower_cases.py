"""What the tower lesson (tower.py) shows the vision tower, and what each merged token must name.

Four kinds of case, each with these labels per merged token (raster order, frame pair by frame pair):
- a suite picture of 0-6 shapes: `shapes` names the (kind, colour) of the shape whose square's centre
  lies in the token's cell, or nothing;
- a suite video (one shape moving, 0-2 still): `shapes` as above in each frame pair (the moving shape
  where its centre is midway between the pair's two frames), and `motion` names its direction there;
- a suite word picture (a word of 3-6 characters and 0-2 shapes): `chars` names, in each quarter of
  the token's width, the character whose centre lies in it (a token of the smallest font holds ~4);
- a word strip: such a word alone on a picture just big enough for it (scenes.strip), labelled the same.

and a fourth label, `boxes`: for the token holding a still shape's centre, that shape's square (left, top, right,
bottom) in token units from the token's own top-left corner; NaN elsewhere (the moving shape of a video
included: it has a box in each frame, not one per pair). A fifth, `digits`, is the same square as the
grounding answer writes it (0-1000 of the picture's width and height): each number's hundreds and tens
digits, x1's first; IGNORE elsewhere.

Why motion and characters (docs/demo.md, "On a GPU"): a tower taught shapes alone gave the decoder
nothing to read a direction or a word from (videos at chance after 2,400 mixed steps); the curriculum's
old tower, which learned directions through the decoder, got them to 95%.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from qwen2vl.demo import scenes, tasks
from qwen2vl.demo.scenes import COLORS, SHAPES, Shape, box_1000, draw_scene, place, random_background, random_size
from qwen2vl.processing.processor import Processor
from qwen2vl.train.examples import IGNORE

SHAPE_CLASSES = 1 + len(SHAPES) * len(COLORS)  # nothing, then every (kind, colour)
DIRECTIONS = tuple(tasks.DIRECTIONS)
MOTION_CLASSES = 1 + len(DIRECTIONS)  # still (or nothing), then each direction
CHARS = scenes.WORD_CHARS
CHAR_CLASSES = 1 + len(CHARS)
SLOTS = 4  # character places across a token's width
DIGITS = 8  # the hundreds and tens of x1, y1, x2, y2
DIGIT_CLASSES = 11  # a hundreds digit of 1000 is 10


@dataclass
class Drawn:
    """A case as the tower sees it: pixel_values, grid_thw and the three per-token labels."""
    pixels: torch.Tensor
    grid: torch.Tensor  # (1, 3)
    shapes: torch.Tensor  # (tokens,)
    motion: torch.Tensor  # (tokens,)
    chars: torch.Tensor  # (tokens, SLOTS)
    boxes: torch.Tensor  # (tokens, 4), NaN where no still shape's centre is
    digits: torch.Tensor  # (tokens, DIGITS), IGNORE where no still shape's centre is

    @staticmethod
    def cat(cases: list[Drawn]) -> Drawn:
        return Drawn(*(torch.cat([getattr(c, f) for c in cases]) for f in ("pixels", "grid", "shapes", "motion",
                                                                             "chars", "boxes", "digits")))


def shape_class(shape: Shape) -> int:
    return 1 + SHAPES.index(shape.kind) * len(COLORS) + list(COLORS).index(shape.color)


class Labels:
    """Empty labels for a (frames, rows, cols) token grid over a picture of width x height px; the
    processor resizes the whole picture onto the grid, so a token's cell is width / cols px wide."""

    def __init__(self, frames: int, rows: int, cols: int, width: int, height: int):
        self.rows, self.cols, self.width, self.height = rows, cols, width, height
        n = frames * rows * cols
        self.shapes = torch.zeros(n, dtype=torch.long)
        self.motion = torch.zeros(n, dtype=torch.long)
        self.chars = torch.zeros(n, SLOTS, dtype=torch.long)
        self.boxes = torch.full((n, 4), float("nan"))
        self.digits = torch.full((n, DIGITS), IGNORE)

    def drawn(self, pixels: torch.Tensor, grid: torch.Tensor) -> Drawn:
        return Drawn(pixels, grid, self.shapes, self.motion, self.chars, self.boxes, self.digits)

    def token(self, frame: int, x: float, y: float) -> tuple[int, float]:
        """(token index, place across its width in [0, 1)) of the point (x, y) px in a frame pair."""
        col_f = min(self.cols - 1e-6, x * self.cols / self.width)
        row = min(self.rows - 1, int(y * self.rows / self.height))
        return (frame * self.rows + row) * self.cols + int(col_f), col_f % 1

    def shape(self, frame: int, shape: Shape, cx: float | None = None, cy: float | None = None) -> int:
        """Label the token holding the shape's centre, or (cx, cy) px for a moving shape (which gets no box)."""
        still = cx is None
        token, _ = self.token(frame, shape.x + shape.side / 2 if still else cx,
                              shape.y + shape.side / 2 if still else cy)
        self.shapes[token] = shape_class(shape)
        if still:
            cell = token % (self.rows * self.cols)
            col, row = cell % self.cols, cell // self.cols
            across, down = self.cols / self.width, self.rows / self.height  # tokens a pixel
            x1, y1, x2, y2 = shape.box
            self.boxes[token] = torch.tensor([x1 * across - col, y1 * down - row, x2 * across - col, y2 * down - row])
            self.digits[token] = torch.tensor([d for v in box_1000(shape.box, self.width, self.height)
                                               for d in (v // 100, v // 10 % 10)])
        return token


def _draw(processor: Processor, content: dict):
    """An image or video part through the processor: (pixel values, grid_thw, (frame pairs, rows, cols) of
    merged tokens)."""
    batch = processor([{"role": "user", "content": [content]}])
    key = "video" if content["type"] == "video" else "image"
    pixels, grid = batch[f"pixel_values{'_videos' if key == 'video' else ''}"], batch[f"{key}_grid_thw"]
    merge = processor.vision.merge_size
    return pixels, grid, (int(grid[0, 0]), int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)


def picture(rng: random.Random, processor: Processor) -> Drawn:
    """A suite picture of 0-6 shapes with its shape labels."""
    while True:
        width, height = random_size(rng)
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 6))]
        shapes = place(rng, width, height, specs)
        if shapes is not None:
            break
    image = draw_scene(width, height, random_background(rng), shapes)
    pixels, grid, (t, rows, cols) = _draw(processor, {"type": "image", "image": image})
    labels = Labels(t, rows, cols, width, height)
    for s in shapes:
        labels.shape(0, s)
    return labels.drawn(pixels, grid)


def video(rng: random.Random, processor: Processor) -> Drawn:
    """A suite video (tasks.video_case): shapes in every frame pair, the moving one's direction."""
    case = tasks.video_case(rng)
    side = case.images[0].size[0]
    pixels, grid, (t, rows, cols) = _draw(processor, {"type": "video", "video": case.images, "fps": tasks.VIDEO_FPS})
    labels = Labels(t, rows, cols, side, side)
    path, direction = case.info["path"], DIRECTIONS.index(case.answer)
    for pair in range(t):
        for s in case.info["shapes"]:
            labels.shape(pair, s)
        a, b = path[min(2 * pair, len(path) - 1)], path[min(2 * pair + 1, len(path) - 1)]  # odd counts: last repeated
        token = labels.shape(pair, a, (a.x + b.x + a.side) / 2, (a.y + b.y + a.side) / 2)
        labels.motion[token] = 1 + direction if a != b else 0
    return labels.drawn(pixels, grid)


def word(rng: random.Random, processor: Processor) -> Drawn:
    """A suite word picture (tasks.text_case): its shapes and each character in its token's quarter."""
    case = tasks.text_case(rng)
    image, text, size = case.images[0], case.info["word"], case.info["size"]
    pixels, grid, (t, rows, cols) = _draw(processor, {"type": "image", "image": image})
    labels = Labels(t, rows, cols, *image.size)
    for s in case.info["shapes"]:
        labels.shape(0, s)
    left, top, _, bottom = case.info["text_box"]
    _label_chars(labels, text, size, left - scenes.font(size).getbbox(text)[0], top, bottom)
    return labels.drawn(pixels, grid)


def strip(rng: random.Random, processor: Processor) -> Drawn:
    """A word of 3-6 characters alone on a strip just big enough for it (scenes.strip), each character in its
    token's quarter: the word kind's glyphs at a tenth of its tokens."""
    text, size = scenes.random_word(rng, (3, 6)), rng.randint(*scenes.FONT_SIZES)
    image, x, y = scenes.strip(rng, text, size)
    pixels, grid, (t, rows, cols) = _draw(processor, {"type": "image", "image": image})
    labels = Labels(t, rows, cols, *image.size)
    _, top, _, bottom = scenes.text_box(text, size, x, y)
    _label_chars(labels, text, size, x, top, bottom)
    return labels.drawn(pixels, grid)


def _label_chars(labels: Labels, text: str, size: int, x: int, top: int, bottom: int) -> None:
    """Each character of `text`, drawn from x, named in the quarter of the token its centre lies in."""
    font = scenes.font(size)
    for i, char in enumerate(text):
        start, end = font.getlength(text[:i]), font.getlength(text[:i + 1])
        token, place_in = labels.token(0, x + (start + end) / 2, (top + bottom) / 2)
        labels.chars[token, int(place_in * SLOTS)] = 1 + CHARS.index(char)


KINDS = {"picture": picture, "video": video, "word": word, "strip": strip}
