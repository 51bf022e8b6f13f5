"""Lessons that are not suite tasks: each picture asked one kind of question about every shape it can be.

    python -m qwen2vl.demo.dataset DIR --kinds 2-6 --cases 4000    # "Which shape is red?" -> "the red circle"
    python -m qwen2vl.demo.dataset DIR --colors --cases 4000       # "What color is the circle?" -> "red"
    python -m qwen2vl.demo.dataset DIR --counts --cases 4000       # "How many circles are there?" -> "2"
    python -m qwen2vl.demo.dataset DIR --where 1-6 --cases 4000    # "Where is the red circle?" -> its box
    python -m qwen2vl.demo.dataset DIR --where 1 --side 280 --cases 4000   # lone shapes, 280 x 280 pictures
    python -m qwen2vl.demo.dataset DIR --words 1 --font 40-64 --side 224 --cases 12800   # one big character
    python -m qwen2vl.demo.dataset DIR --words 3-6 --strip --cases 20000   # words on strips just big enough

Written as dataset.py writes the suite's lines (DIR/train.jsonl and DIR/img/), for `qwen2vl train`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qwen2vl.demo import scenes
from qwen2vl.demo.scenes import (
    COLORS,
    MAX_SIDE,
    SHAPES,
    draw_scene,
    fit,
    fits,
    random_background,
    random_size,
    random_word,
    text_box,
)
from qwen2vl.demo.tasks import TEXT_QUESTION, box_answer, color_question, count_question, where_question


def kind_question(color: str) -> str:
    return f"Which shape is {color}?"


def write_kind_set(out: str | Path, cases: int, seed: int, shapes: tuple[int, int] = (1, 6),
                   fraction: tuple[float, float] | None = None) -> Path:
    """`cases` pictures of `shapes` shapes (lo-hi) in distinct colours, each shape asked about in random
    order: "Which shape is red?" -> "the red circle". Not a suite task: a lesson in the shapes' kinds,
    which the tower had not learnt after stage 9 (it named a lone shape's kind right 8 / 27 times, chance
    9; colours 24 / 27), so "What color is the circle?" among other shapes was a guess among the colours
    present. The answer is the grounding's words, whose tokens training had already moved (a bare
    "circle" is the untrained bytes c-ir-cle). `fraction`: shape sides as this share of the picture's
    shorter side (default the suite's 12-25%; bigger shapes are the easier first lesson)."""
    def lesson(rng: random.Random):
        colors = rng.sample(list(COLORS), rng.randint(*shapes))
        width, height, drawn = fit(rng, [(rng.choice(SHAPES), c) for c in colors], fraction)
        image = draw_scene(width, height, random_background(rng), drawn)
        return image, [(kind_question(s.color), f"the {s.color} {s.kind}") for s in rng.sample(drawn, len(drawn))]

    return _write_lesson(out, cases, f"qwen2vl-demo-kind:{seed}", lesson)


def write_color_set(out: str | Path, cases: int, seed: int) -> Path:
    """`cases` pictures of 1-6 shapes in distinct colours, where each kind drawn once is asked its colour, in
    random order: "What color is the circle?" -> "red" (the suite's colour question, asked of every kind
    it can be). The kind lesson (write_kind_set) read the other way: after it, the model named a shape by
    its colour among several (77 / 80) but a colour by its kind ~1 / 3 of the time (docs/demo.md, "A second
    GPU run"), though its lines asked both about as often."""
    def lesson(rng: random.Random):
        asked = rng.sample(SHAPES, rng.randint(1, 3))
        others = [k for k in SHAPES if k not in asked]
        kinds = asked + [rng.choice(others) for _ in range(rng.randint(0, 6 - len(asked)) if others else 0)]
        width, height, drawn = fit(rng, list(zip(kinds, rng.sample(list(COLORS), len(kinds)))))
        image = draw_scene(width, height, random_background(rng), drawn)
        once = [s for s in drawn if kinds.count(s.kind) == 1]
        return image, [(color_question(s.kind), s.color) for s in rng.sample(once, len(once))]

    return _write_lesson(out, cases, f"qwen2vl-demo-color:{seed}", lesson)


def write_count_set(out: str | Path, cases: int, seed: int) -> Path:
    """`cases` pictures of 0-6 shapes, each asked how many of every kind drawn and how many shapes in all, in
    random order: "How many circles are there?" -> "2". As the suite's count questions draw them: one kind
    0-6 times (asked even when 0), the others filling 0 to 6 - that, colours at random (repeats too). After
    the colour lesson the model counted all of a picture's shapes right in 77% of seed 78's cases but one
    kind's in 37% (docs/demo.md). Asking every kind, absent ones too, made two in three kind answers small
    and a third "0": the model then answered "0" to most kind questions (1-5 of a kind: 1 / 57 right)."""
    def lesson(rng: random.Random):
        kind, n = rng.choice(SHAPES), rng.randint(0, 6)
        kinds = [kind] * n + [rng.choice([k for k in SHAPES if k != kind]) for _ in range(rng.randint(0, 6 - n))]
        width, height, drawn = fit(rng, [(k, rng.choice(list(COLORS))) for k in kinds])
        image = draw_scene(width, height, random_background(rng), drawn)
        turns = [(count_question(k), str(kinds.count(k))) for k in SHAPES if k == kind or k in kinds]
        turns.append((count_question(), str(len(kinds))))
        return image, rng.sample(turns, len(turns))

    return _write_lesson(out, cases, f"qwen2vl-demo-count:{seed}", lesson)


def write_box_set(out: str | Path, cases: int, seed: int, shapes: tuple[int, int] = (1, 6),
                  side: int | None = None) -> Path:
    """`cases` pictures of `shapes` shapes (lo-hi), no two of the same colour and kind, each asked its box in
    random order: "Where is the red circle?" -> the suite's grounding answer. A suite line asks one box a
    picture; the tower's pass over the picture is most of a step's cost, so asking every shape's box gives
    the digits, which take thousands of steps to leave chance (docs/demo.md), several times the signal a step.
    `side`: every picture side x side, so that a box is the shape's place on one grid (no division by the
    picture's size): the first boxes on the 2 cores were learnt on lone shapes at 280 x 280."""
    def lesson(rng: random.Random):
        pairs = rng.sample([(k, c) for k in SHAPES for c in COLORS], rng.randint(*shapes))
        width, height, drawn = fit(rng, pairs, side=side)
        image = draw_scene(width, height, random_background(rng), drawn)
        return image, [(where_question(s), box_answer(s, width, height)) for s in rng.sample(drawn, len(drawn))]

    return _write_lesson(out, cases, f"qwen2vl-demo-box:{seed}", lesson)


def write_word_set(out: str | Path, cases: int, seed: int, letters: tuple[int, int] = (3, 6),
                   sizes: tuple[int, int] = (18, 40), side: int | None = None, strip: bool = False) -> Path:
    """`cases` pictures of one word of `letters` characters (lo-hi) from the suite's A-Z0-9 in black, font size
    `sizes` (lo-hi), nothing else drawn: "What does the text say?" -> the word. The suite's reading task with
    its sizes as knobs: from the shipped checkpoint, 400 steps of words of 1-3 characters at 32-56 px stayed at
    chance, and 800 of one character at 40-64 px on 224 x 224 pictures read 78 / 200 held-out characters
    (docs/demo.md), so the lesson starts from one big character and moves to the suite's words. `side`: every
    picture side x side (default the suite's random sizes); a size the word does not fit is drawn again.
    `strip`: instead, each picture just big enough for its word (scenes.strip: 56 px tall, 4-16 tokens)."""
    return _write_lesson(out, cases, *word_lesson(seed, letters, sizes, side, strip))


def word_lesson(seed: int, letters: tuple[int, int] = (3, 6), sizes: tuple[int, int] = (18, 40),
                side: int | None = None, strip: bool = False):
    """(name, lesson) of `write_word_set`'s set of `seed`: `lesson_case(name, lesson, i)` is its picture i,
    drawn again without writing it (the reading report's held-out strips)."""
    if not (1 <= letters[0] <= letters[1] and 1 <= sizes[0] <= sizes[1]):
        raise ValueError(f"words of {letters[0]}-{letters[1]} characters at font {sizes[0]}-{sizes[1]}: each range is "
                         "lo-hi with 1 <= lo <= hi")
    if strip:
        _, top, _, bottom = text_box(scenes.WORD_CHARS, sizes[1], 0, 0)
        if (tallest := bottom - top) > scenes.STRIP_HEIGHT:
            raise ValueError(f"a word at font {sizes[1]} is up to {tallest} px tall, more than a strip's "
                             f"{scenes.STRIP_HEIGHT} px: use fonts up to {sizes[1] * scenes.STRIP_HEIGHT // tallest}")

    def lesson(rng: random.Random):
        word = random_word(rng, letters)
        if strip:
            return scenes.strip(rng, word, rng.randint(*sizes))[0], [(TEXT_QUESTION, word)]
        most = side or MAX_SIDE
        left, top, right, bottom = text_box(word, sizes[0], 0, 0)
        if not fits((left, top, right, bottom), most, most):  # else the loop below would never end
            raise ValueError(f"{word!r} at font {sizes[0]} is {right - left} x {bottom - top} px, more than the "
                             f"{most} x {most} px pictures hold: use smaller fonts or fewer characters")
        while True:
            width, height = (side, side) if side else random_size(rng)
            size = rng.randint(*sizes)
            left, top, right, bottom = text_box(word, size, 0, 0)
            if fits((left, top, right, bottom), width, height):
                break
        x, y = rng.randint(-left, width - right), rng.randint(-top, height - bottom)
        image = draw_scene(width, height, random_background(rng), [], word=(word, size, x, y))
        return image, [(TEXT_QUESTION, word)]

    return f"qwen2vl-demo-{'strip' if strip else 'word'}:{seed}", lesson


def lesson_case(name: str, lesson, index: int):
    """Case `index` of the lesson set `name`: (picture, [(question, answer), ...])."""
    return lesson(random.Random(f"{name}:{index}"))


def _write_lesson(out: str | Path, cases: int, name: str, lesson) -> Path:
    """OUT/train.jsonl and OUT/img/: case i is `lesson_case(name, lesson, i)` = (picture, [(question, answer),
    ...]), one line a picture, its questions asked in turn."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for index in range(cases):
            image, turns = lesson_case(name, lesson, index)
            picture = f"img/{index:06d}.png"
            image.save(out / picture)
            messages = []
            for question, answer in turns:
                messages += [{"role": "user", "content": ("<image>" if not messages else "") + question},
                             {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages, "images": [picture]}) + "\n")
    return path
