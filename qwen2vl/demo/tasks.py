"""The demo suite's six tasks: seeded cases of (images or a video, question, answer).

    case = render_case("grounding", seed=0, index=7)
    case.messages   # Qwen form: [{"role": "user", "content": [{"type": "image", "image": <PIL>}, {"type": "text"...}]}]
    case.answer     # e.g. "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(..),(..)<|box_end|>"

A case depends only on (task, seed, index), so anyone can render the same case again, or a fresh
held-out set with another seed. Answers are lower case without a final period, except a word read
from an image, which is answered as written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from qwen2vl.demo import scenes
from qwen2vl.demo.scenes import COLORS, SHAPES, Shape, box_1000, draw_scene, place, random_background, random_size
from qwen2vl.grounding import BOX_END, BOX_START, REF_END, REF_START

TASKS = ("color", "count", "grounding", "text", "video", "two_images")
VIDEO_FRAMES = (4, 8)
VIDEO_SIDE = (112, 224)  # square frames
VIDEO_FPS = 2.0
MIN_STEP = 0.08  # of the frame's side, per frame
TEXT_QUESTION = "What does the text say?"
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass
class Case:
    task: str
    images: list[Image.Image]  # the images, or the video's frames
    question: str
    answer: str
    is_video: bool = False
    info: dict = field(default_factory=dict)  # what was drawn (shapes, word), for checks

    @property
    def messages(self) -> list[dict]:
        if self.is_video:
            media = [{"type": "video", "video": list(self.images), "fps": VIDEO_FPS}]
        else:
            media = [{"type": "image", "image": image} for image in self.images]
        return [{"role": "user", "content": [*media, {"type": "text", "text": self.question}]}]


def render_case(task: str, seed: int, index: int) -> Case:
    """Case `index` of `task` in the set named by `seed`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"qwen2vl-demo:{seed}:{task}:{index}")  # str seeds hash the same in every process
    return _MAKERS[task](rng)


def render_cases(seed: int, cases_per_task: int, tasks=TASKS) -> list[Case]:
    return [render_case(task, seed, i) for task in tasks for i in range(cases_per_task)]


def _other(rng, specs_to_avoid: set, n: int, kinds=SHAPES) -> list[tuple[str, str]]:
    """n random (kind, color) pairs, none of them in `specs_to_avoid`."""
    pool = [(k, c) for k in kinds for c in COLORS if (k, c) not in specs_to_avoid]
    return [rng.choice(pool) for _ in range(n)]


def _scene(rng, specs: list[tuple[str, str]]) -> tuple[Image.Image, list[Shape]]:
    """An image of random size and background holding shapes of `specs` (the size is drawn again
    until they fit)."""
    width, height, shapes = scenes.fit(rng, specs)
    rng.shuffle(shapes)
    return draw_scene(width, height, random_background(rng), shapes), shapes


def color_question(kind: str) -> str:
    return f"What color is the {kind}?"


def count_question(kind: str | None = None) -> str:
    """How many shapes, or (`kind`) how many of that kind."""
    return f"How many {kind}s are there?" if kind else "How many shapes are there?"


def where_question(shape: Shape) -> str:
    return f"Where is the {shape.name}?"


def box_answer(shape: Shape, width: int, height: int) -> str:
    """The grounding answer for `shape` in a width x height picture: its name and its square on the 0-1000 scale."""
    x1, y1, x2, y2 = box_1000(shape.box, width, height)
    return f"{REF_START}the {shape.name}{REF_END}{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"


def color_case(rng) -> Case:
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    others = _other(rng, set(), rng.randint(0, 5), kinds=[k for k in SHAPES if k != kind])
    image, shapes = _scene(rng, [(kind, color), *others])
    return Case("color", [image], color_question(kind), color, info={"shapes": shapes})


def count_case(rng) -> Case:
    if rng.random() < 0.5:
        n = rng.randint(0, 6)
        image, shapes = _scene(rng, _other(rng, set(), n))
        return Case("count", [image], count_question(), str(n), info={"shapes": shapes})
    kind, n = rng.choice(SHAPES), rng.randint(0, 6)
    specs = [(kind, rng.choice(list(COLORS))) for _ in range(n)]
    specs += _other(rng, set(), rng.randint(0, 6 - n), kinds=[k for k in SHAPES if k != kind])
    image, shapes = _scene(rng, specs)
    return Case("count", [image], count_question(kind), str(n), info={"shapes": shapes})


def grounding_case(rng) -> Case:
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    image, shapes = _scene(rng, [(kind, color), *_other(rng, {(kind, color)}, rng.randint(0, 5))])
    target = next(s for s in shapes if (s.kind, s.color) == (kind, color))
    return Case("grounding", [image], where_question(target), box_answer(target, *image.size),
                info={"shapes": shapes, "box": target.box})


def text_case(rng) -> Case:
    word = scenes.random_word(rng, (3, 6))
    while True:
        width, height = random_size(rng)
        size = rng.randint(*scenes.FONT_SIZES)
        while size > scenes.FONT_SIZES[0] and not scenes.fits(scenes.text_box(word, size, 0, 0), width, height):
            size -= 1
        left, top, right, bottom = scenes.text_box(word, size, 0, 0)
        if not scenes.fits((left, top, right, bottom), width, height):
            continue
        x, y = rng.randint(-left, width - right), rng.randint(-top, height - bottom)
        keep_out = scenes.text_box(word, size, x, y)
        shapes = place(rng, width, height, _other(rng, set(), rng.randint(0, 2)), keep_out=[keep_out])
        if shapes is not None:
            image = draw_scene(width, height, random_background(rng), shapes, word=(word, size, x, y))
            return Case("text", [image], TEXT_QUESTION, word,
                        info={"shapes": shapes, "word": word, "size": size, "text_box": keep_out})


def video_case(rng) -> Case:
    side = rng.randint(*VIDEO_SIDE)
    frames = rng.randint(*VIDEO_FRAMES)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    while True:
        s = rng.randint(*scenes.shape_sides(side, side))
        lo, hi = -(-MIN_STEP * side // 1), (side - s) // (frames - 1)
        step = rng.randint(int(lo), hi)
        travel = step * (frames - 1)
        # start so that the whole path stays inside the frame
        along = rng.randint(0, side - s - travel)
        across = rng.randint(0, side - s)
        if dx:
            x0, y0 = (along if dx > 0 else along + travel), across
        else:
            x0, y0 = across, (along if dy > 0 else along + travel)
        path = [Shape(kind, color, x0 + dx * step * i, y0 + dy * step * i, s) for i in range(frames)]
        swept = (min(p.x for p in path), min(p.y for p in path), max(p.x for p in path) + s, max(p.y for p in path) + s)
        still = place(rng, side, side, _other(rng, {(kind, color)}, rng.randint(0, 2)), keep_out=[swept])
        if still is not None:
            break
    background = random_background(rng)
    images = [draw_scene(side, side, background, [*still, moving]) for moving in path]
    return Case("video", images, f"Which direction does the {color} {kind} move?", direction, is_video=True,
                info={"path": path, "shapes": still, "step": step})


def two_images_case(rng) -> Case:
    first, second = rng.sample(range(7), 2)
    images, shapes = zip(*(_scene(rng, _other(rng, set(), n)) for n in (first, second)))
    answer = "first" if first > second else "second"
    return Case("two_images", list(images), "Which image has more shapes, the first or the second?", answer,
                info={"shapes": list(shapes)})


_MAKERS = {"color": color_case, "count": count_case, "grounding": grounding_case, "text": text_case,
           "video": video_case, "two_images": two_images_case}
