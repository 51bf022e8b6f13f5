"""The demo suite's renderer follows its spec, checked on the pixels: sizes, colours, gaps, and every
answer recomputed from what was drawn (shapes found as connected regions of a palette colour, the
word as the dark pixels, a video's motion from where the shape is in each frame)."""

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from qwen2vl.demo import scenes
from qwen2vl.demo.dataset import LIST_QUESTION, extra_turns, record, task_counts
from qwen2vl.demo.scenes import COLORS, apart
from qwen2vl.demo.score import iou, score
from qwen2vl.demo.tasks import TASKS, render_case
from qwen2vl.grounding import parse_grounding

CASES = 12  # per task and test: ~1 s in all


def regions(image) -> list[dict]:
    """Every connected region of one palette colour: its colour name and pixel box (x2/y2 exclusive)."""
    a = np.asarray(image)
    found = []
    for name, rgb in COLORS.items():
        labels, n = ndimage.label((a == rgb).all(-1))
        for sl in ndimage.find_objects(labels):
            found.append({"color": name, "box": (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)})
    return found


def drawn_extent(shape) -> tuple[int, int, int, int]:
    """Where `shape`'s pixels must lie: its square, less the corners a triangle leaves empty."""
    x1, y1, x2, y2 = shape.box
    if shape.kind != "triangle":
        return x1, y1, x2, y2
    half = shape.side * 3**0.5 / 4  # the inscribed triangle is sqrt(3)/2 of the side wide, 3/4 high
    cx = x1 + shape.side / 2
    return round(cx - half), y1, round(cx + half), round(y1 + 0.75 * shape.side)


def check_scene(image, shapes, text_box=None):
    width, height = image.size
    assert scenes.MIN_SIDE <= width <= scenes.MAX_SIDE and scenes.MIN_SIDE <= height <= scenes.MAX_SIDE
    a = np.asarray(image).astype(np.int32)
    values, counts = np.unique((a[..., 0] << 16 | a[..., 1] << 8 | a[..., 2]).ravel(), return_counts=True)
    top = int(values[counts.argmax()])
    background = (top >> 16, top >> 8 & 255, top & 255)
    assert all(200 <= c <= 255 for c in background)
    lo, hi = scenes.shape_sides(width, height)
    assert 0 <= len(shapes) <= 6
    for i, s in enumerate(shapes):
        assert lo <= s.side <= hi and max(16, 0.12 * min(width, height)) <= s.side <= max(16, 0.25 * min(width, height))
        assert 0 <= s.x and s.x + s.side <= width and 0 <= s.y and s.y + s.side <= height
        assert all(apart(s.box, t.box, 4) for t in shapes[i + 1:])
        if text_box is not None:
            assert apart(s.box, text_box, 4)
    # one region per shape, of its colour, inside its square and filling the extent its kind draws
    found = regions(image)
    assert len(found) == len(shapes)
    for s in shapes:
        (r,) = [r for r in found if r["color"] == s.color and iou(r["box"], s.box) > 0.3]
        ex = drawn_extent(s)
        assert all(abs(a - b) <= 1 for a, b in zip(r["box"], ex)), (s, r["box"], ex)
    return found


@pytest.mark.parametrize("task", ["color", "count", "grounding", "text"])
def test_single_image_cases_follow_the_spec_and_their_answers_hold(task):
    for i in range(CASES):
        case = render_case(task, seed=7, index=i)
        (image,) = case.images
        found = check_scene(image, case.info["shapes"], case.info.get("text_box"))
        shapes = case.info["shapes"]
        if task == "color":
            kind = case.question.removeprefix("What color is the ").removesuffix("?")
            (only,) = [s for s in shapes if s.kind == kind]
            assert case.answer == only.color and any(r["color"] == only.color for r in found)
        elif task == "count":
            kind = case.question.removeprefix("How many ").removesuffix("s are there?")
            expected = len(found) if kind == "shape" else sum(s.kind == kind for s in shapes)
            assert case.answer == str(expected) and 0 <= expected <= 6
        elif task == "grounding":
            color, kind = case.question.removeprefix("Where is the ").removesuffix("?").split()
            (target,) = [s for s in shapes if (s.kind, s.color) == (kind, color)]
            (region,) = parse_grounding(case.answer, *image.size)
            assert region.label == f"the {color} {kind}"
            assert all(abs(a - b) <= 1 for a, b in zip(region.bbox, target.box))  # 0-1000 rounding
            assert score(case, case.answer) and not score(case, case.answer.replace("(", "(9"))
        else:
            word = case.answer
            assert 3 <= len(word) <= 6 and set(word) <= set(scenes.WORD_CHARS)
            assert scenes.FONT_SIZES[0] <= case.info["size"] <= scenes.FONT_SIZES[1] and len(shapes) <= 2
            dark = np.argwhere((np.asarray(image) < 100).all(-1))
            (y1, x1), (y2, x2) = dark.min(0), dark.max(0) + 1
            tx1, ty1, tx2, ty2 = case.info["text_box"]
            assert tx1 <= x1 and ty1 <= y1 and x2 <= tx2 and y2 <= ty2  # the ink stays in the kept-out box
            assert (x2 - x1) >= 6 * len(word) and (y2 - y1) >= 10  # drawn, at least 18 px type


def test_video_cases_move_one_shape_straight_by_at_least_8_percent_a_frame():
    for i in range(CASES):
        case = render_case("video", seed=7, index=i)
        frames = [np.asarray(f) for f in case.images]
        side = case.images[0].width
        assert 4 <= len(frames) <= 8 and all(f.shape == (side, side, 3) for f in frames) and 112 <= side <= 224
        color, kind = case.question.removeprefix("Which direction does the ").removesuffix(" move?").split()
        still = [s.box for s in case.info["shapes"]]
        centres = []
        for f in frames:  # the moving shape: the region of its colour that is no still shape
            labels, _ = ndimage.label((f == COLORS[color]).all(-1))
            boxes = [(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) for sl in ndimage.find_objects(labels)]
            (box,) = [b for b in boxes if all(apart(b, s, 1) for s in still)]
            centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
        steps = np.diff(np.array(centres), axis=0)  # [frames - 1, 2] as (dx, dy)
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[case.answer]
        along = steps @ np.array([dx, dy])
        across = steps @ np.array([dy, dx])
        assert (along >= 0.08 * side - 1).all() and (np.abs(across) <= 1).all()
        assert (frames[0] != frames[-1]).any() and kind in scenes.SHAPES


def test_two_image_cases_answer_which_has_more_shapes():
    for i in range(CASES):
        case = render_case("two_images", seed=7, index=i)
        counts = [len(check_scene(im, shapes)) for im, shapes in zip(case.images, case.info["shapes"])]
        assert counts[0] != counts[1] and case.answer == ("first" if counts[0] > counts[1] else "second")


def test_cases_are_reproducible_and_seeds_differ():
    for task in TASKS:
        a, b = render_case(task, 3, 5), render_case(task, 3, 5)
        assert a.question == b.question and a.answer == b.answer
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    answers = lambda seed: [render_case("grounding", seed, i).answer for i in range(5)]
    assert answers(1) != answers(2)
    with pytest.raises(ValueError, match="unknown task"):
        render_case("colour", 0, 0)


def test_training_rows_hold_the_case_first_and_only_true_extra_questions():
    assert task_counts(1000) == {"color": 95, "count": 143, "grounding": 238, "text": 286, "video": 95,
                                 "two_images": 143}
    assert sum(task_counts(37).values()) == 37
    case = render_case("grounding", 4, 2)
    extra = extra_turns(case, random.Random(0), 8)
    row = record(case, extra, ["img/a.png"])
    shapes = case.info["shapes"]
    assert row["messages"][0] == {"role": "user", "content": "<image>" + case.question}
    assert row["messages"][1]["content"] == case.answer and row["images"] == ["img/a.png"]
    shapes = case.info["shapes"]
    assert extra[0] == (LIST_QUESTION, ", ".join(s.name for s in sorted(shapes, key=lambda s: (s.x + s.side / 2, s.y))))
    for q, a in extra[1:]:  # every extra answer is true of the picture
        if q.startswith("Where"):
            (region,) = parse_grounding(a, *case.images[0].size)
            assert any(iou(region.bbox, s.box) > 0.9 and q == f"Where is the {s.name}?" for s in shapes)
        elif q == "How many shapes are there?":
            assert a == str(len(shapes))
        elif q.startswith("How many"):
            assert a == str(sum(s.kind + "s" in q for s in shapes))
        else:
            assert [s.color for s in shapes if s.kind in q] == [a]
    video = render_case("video", 4, 0)
    assert extra_turns(video, random.Random(0), 3) == []
    empty = next(c for c in (render_case("count", 4, i) for i in range(50)) if not c.info["shapes"])
    assert extra_turns(empty, random.Random(0), 1) == [(LIST_QUESTION, "none")]
    assert record(video, [], ["f0.png", "f1.png"])["videos"] == [["f0.png", "f1.png"]]


def test_the_first_stage_subset_keeps_pictures_of_at_most_n_shapes_and_the_videos(tmp_path):
    import json

    from qwen2vl.demo.dataset import shapes_in, write_dataset, write_subset

    train = write_dataset(tmp_path, 60, seed=5, extra=6)
    lines = [json.loads(t) for t in open(train)]
    easy = [json.loads(t) for t in open(write_subset(train, tmp_path / "easy.jsonl", 1))]
    opens_long = lambda line: line["messages"][0]["content"].startswith(("<image>Where", "<image>What does"))
    want = [line for line in lines if not opens_long(line)
            and ("videos" in line or (shapes_in(line) is not None and shapes_in(line) <= 1))]
    assert 0 < len(easy) == len(want) < len(lines)
    for got, line in zip(easy, want):  # the same lines, less their box questions
        kept = [m for m in line["messages"] if m in got["messages"]]
        assert got["messages"] == kept and got.get("images") == line.get("images")
        assert not any(m["content"].startswith(("Where", "<|object_ref_start|>")) for m in got["messages"])
        assert got["messages"][:2] == line["messages"][:2]
    for line in lines:
        if "images" in line and len(line["images"]) == 1:
            asked = [m["content"].removeprefix("<image>") for m in line["messages"][::2]]
            turns = dict(zip(asked, [m["content"] for m in line["messages"][1::2]]))
            if "How many shapes are there?" in turns:  # shapes_in agrees with the count answer
                assert str(shapes_in(line)) == turns["How many shapes are there?"]
    with_pairs = [json.loads(t) for t in open(write_subset(train, tmp_path / "pairs.jsonl", 6, pairs=True))]
    assert [line for line in with_pairs if len(line.get("images", ())) == 2] == [
        line for line in lines if len(line.get("images", ())) == 2] != []
    with pytest.raises(ValueError, match="next to"):
        write_subset(train, tmp_path / "sub" / "easy.jsonl", 1)



def test_the_boxes_subset_adds_the_lines_that_open_with_a_box_and_no_other_box(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_dataset, write_subset

    train = write_dataset(tmp_path, 60, seed=5, extra=6)
    lines = [json.loads(t) for t in open(train)]
    short = [json.loads(t) for t in open(write_subset(train, tmp_path / "short.jsonl", 6, pairs=True))]
    boxes = [json.loads(t) for t in open(write_subset(train, tmp_path / "boxes.jsonl", 6, pairs=True, boxes=True))]
    opens_box = [line for line in lines if line["messages"][0]["content"].startswith("<image>Where")]
    assert opens_box and len(boxes) == len(short) + len(opens_box)
    assert not any(line["messages"][0]["content"].startswith("<image>What does") for line in boxes)
    for line in boxes:
        asked = [m["content"].removeprefix("<image>") for m in line["messages"][::2]]
        assert not any(q.startswith("Where") for q in asked[1:])  # one box a line, the case's own
        assert all(m["content"].startswith("<|object_ref_start|>") == q.startswith("Where")
                   for q, m in zip(asked, line["messages"][1::2]))
    assert [line for line in boxes if not line["messages"][0]["content"].startswith("<image>Where")] == short


def test_the_mix_weights_the_tasks_and_leaves_out_the_ones_not_named(tmp_path, capsys):
    import json

    from qwen2vl.demo.dataset import main

    main([str(tmp_path), "--cases", "24", "--seed", "5", "--mix", "color=2,count=1,two_images=1"])
    firsts = [json.loads(t)["messages"][0]["content"] for t in open(tmp_path / "train.jsonl")]
    assert sum(q.startswith("<image>What color") for q in firsts) == 12
    assert sum(q.startswith("<image>How many") for q in firsts) == 6
    assert sum(q.startswith("<image><image>Which image") for q in firsts) == 6
    for bad, why in (("colour=1", "unknown task 'colour'"), ("color=x", "must be a number")):
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--cases", "2", "--mix", bad])
        assert why in capsys.readouterr().err


def test_the_kind_lesson_asks_every_shape_of_distinct_colours_and_names_the_kind_drawn(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_kind_set

    lines = [json.loads(t) for t in open(write_kind_set(tmp_path, 12, 4, (2, 6)))]
    assert len(lines) == 12
    fill = {"square": (0.95, 1.0), "circle": (0.7, 0.85), "triangle": (0.3, 0.55)}  # of the region's box
    for line in lines:
        a = np.asarray(Image.open(tmp_path / line["images"][0]))
        found = {r["color"]: r["box"] for r in regions(Image.fromarray(a))}
        asked = [m["content"].removeprefix("<image>") for m in line["messages"][::2]]
        answers = [m["content"] for m in line["messages"][1::2]]
        assert line["messages"][0]["content"].startswith("<image>") and 2 <= len(asked) == len(found) <= 6
        assert sorted(q.removeprefix("Which shape is ").removesuffix("?") for q in asked) == sorted(found)
        for q, answer in zip(asked, answers):
            color = q.removeprefix("Which shape is ").removesuffix("?")
            the, said_color, kind = answer.split()
            x1, y1, x2, y2 = found[color]
            share = (a[y1:y2, x1:x2] == COLORS[color]).all(-1).mean()
            assert (the, said_color) == ("the", color) and fill[kind][0] <= share <= fill[kind][1], (answer, share)
    big = [json.loads(t) for t in open(write_kind_set(tmp_path / "big", 6, 4, (1, 1), fraction=(0.4, 0.8)))]
    for line in big:
        image = Image.open(tmp_path / "big" / line["images"][0])
        ((x1, y1, x2, y2),) = [r["box"] for r in regions(image)]
        assert 0.4 * min(image.size) - 1 <= max(x2 - x1, y2 - y1) <= 0.8 * min(image.size)


def test_the_single_task_set_holds_the_first_cases_with_that_many_shapes(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_single_task

    lines = [json.loads(t) for t in open(write_single_task(tmp_path, 5, 3, "color", 1))]
    first = [c for c in (render_case("color", 3, i) for i in range(200)) if len(c.info["shapes"]) == 1][:5]
    assert [line["messages"][1]["content"] for line in lines] == [c.answer for c in first]
    assert all(len(line["messages"]) == 2 and len(regions(Image.open(tmp_path / line["images"][0]))) == 1
               for line in lines)


def test_the_single_task_set_of_videos_keeps_every_frame(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_single_task

    lines = [json.loads(t) for t in open(write_single_task(tmp_path, 3, 3, "video", None))]
    cases = [render_case("video", 3, i) for i in range(3)]
    assert [line["messages"][0]["content"] for line in lines] == ["<video>" + c.question for c in cases]
    assert [line["messages"][1]["content"] for line in lines] == [c.answer for c in cases]
    for line, case in zip(lines, cases):
        (frames,) = line["videos"]
        assert len(frames) == len(case.images)
        assert all(np.array_equal(np.asarray(Image.open(tmp_path / f)), np.asarray(image))
                   for f, image in zip(frames, case.images))


FILL = {"square": (0.95, 1.0), "circle": (0.7, 0.85), "triangle": (0.3, 0.55)}  # a kind's share of its box


def shapes_drawn(path) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """(colour, kind, pixel box) of every shape in the picture, read from its pixels: shapes are GAP px apart,
    so each is one region of its colour, and its kind is how much of its box it fills."""
    a = np.asarray(Image.open(path))
    drawn = []
    for r in regions(Image.fromarray(a)):
        x1, y1, x2, y2 = r["box"]
        share = (a[y1:y2, x1:x2] == COLORS[r["color"]]).all(-1).mean()
        drawn.append((r["color"], next(k for k, (lo, hi) in FILL.items() if lo <= share <= hi), r["box"]))
    return drawn


def kinds_drawn(path) -> list[tuple[str, str]]:
    """(colour, kind) of every shape in the picture (shapes_drawn)."""
    return [(color, kind) for color, kind, _ in shapes_drawn(path)]


def test_the_colour_lesson_asks_the_colour_of_every_kind_drawn_once(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_color_set

    lines = [json.loads(t) for t in open(write_color_set(tmp_path, 16, 6))]
    asked_any = 0
    for line in lines:
        kinds = dict(kinds_drawn(tmp_path / line["images"][0]))  # colour -> the kind drawn in it (distinct)
        once = {k for k in kinds.values() if list(kinds.values()).count(k) == 1}
        asked = [m["content"].removeprefix("<image>") for m in line["messages"][::2]]
        answers = [m["content"] for m in line["messages"][1::2]]
        assert line["messages"][0]["content"].startswith("<image>")
        assert sorted(q.removeprefix("What color is the ").removesuffix("?") for q in asked) == sorted(once)
        for q, color in zip(asked, answers):
            assert kinds[color] == q.removeprefix("What color is the ").removesuffix("?"), (q, color)
        asked_any += len(asked)
    assert asked_any >= 24


def test_the_count_lesson_asks_how_many_of_every_kind_drawn_and_in_all(tmp_path):
    import json

    from qwen2vl.demo.dataset import write_count_set

    lines = [json.loads(t) for t in open(write_count_set(tmp_path, 40, 7))]
    most = zeros = 0
    for line in lines:
        drawn = [kind for _, kind in kinds_drawn(tmp_path / line["images"][0])]
        asked = [m["content"].removeprefix("<image>") for m in line["messages"][::2]]
        answers = dict(zip(asked, (m["content"] for m in line["messages"][1::2])))
        assert line["messages"][0]["content"].startswith("<image>") and len(answers) == len(asked)
        assert answers.pop("How many shapes are there?") == str(len(drawn))
        counts = {f"How many {k}s are there?": str(drawn.count(k)) for k in FILL}
        assert answers == {q: a for q, a in counts.items() if q in answers}
        assert sum(a == "0" for a in answers.values()) <= 1  # only the kind the suite would ask about
        assert {q for q, a in counts.items() if a != "0"} <= set(answers)  # every kind drawn is asked
        most = max(most, *map(drawn.count, FILL))
        zeros += "0" in answers.values()
    assert most >= 4 and zeros  # one kind drawn often, or not at all, as the suite's count questions draw it


@pytest.mark.parametrize("shapes, side", [((2, 6), None), ((1, 1), 280)])
def test_the_box_lesson_asks_the_box_of_every_shape_and_each_box_holds_its_shape(tmp_path, shapes, side):
    import json

    from qwen2vl.demo.dataset import write_box_set

    lines = [json.loads(t) for t in open(write_box_set(tmp_path, 12, 8, shapes, side))]
    sizes = set()
    for line in lines:
        image = Image.open(tmp_path / line["images"][0])
        sizes.add(image.size)
        drawn = {f"{color} {kind}": box for color, kind, box in shapes_drawn(tmp_path / line["images"][0])}
        asked = [m["content"].removeprefix("<image>").removeprefix("Where is the ").removesuffix("?")
                 for m in line["messages"][::2]]
        assert line["messages"][0]["content"].startswith("<image>") and shapes[0] <= len(asked) <= shapes[1]
        assert sorted(asked) == sorted(drawn)  # every shape asked once: no two of one colour and kind
        for name, m in zip(asked, line["messages"][1::2]):
            (region,) = parse_grounding(m["content"], *image.size)
            assert region.label == f"the {name}" and region.kind == "box"
            bx1, by1, bx2, by2 = region.bbox
            x1, y1, x2, y2 = drawn[name]  # the shape's pixels lie in its box (the 0-1000 scale rounds)
            assert bx1 - 2 <= x1 and by1 - 2 <= y1 and x2 <= bx2 + 2 and y2 <= by2 + 2, (name, region.bbox, drawn[name])
            assert (x2 - x1) * (y2 - y1) >= 0.5 * (bx2 - bx1) * (by2 - by1)
    assert sizes == {(side, side)} if side else len(sizes) > 6  # one size when asked, else the suite's spread


def ink(pixels, background) -> np.ndarray:
    """The pixels a black word darkened past half of `background`, cropped to their box."""
    mask = pixels[..., 0] < background[0] / 2
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def overlap(a, b) -> float:
    """IoU of two ink masks laid top-left on one canvas."""
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    pa, pb = np.zeros((h, w), bool), np.zeros((h, w), bool)
    pa[:a.shape[0], :a.shape[1]], pb[:b.shape[0], :b.shape[1]] = a, b
    return (pa & pb).sum() / (pa | pb).sum()


def likeness(seen, word, size) -> float:
    """`word` drawn on white at font `size` against the ink `seen` in a picture."""
    reference = Image.new("RGB", (600, 200), (255, 255, 255))
    ImageDraw.Draw(reference).text((20, 20), word, fill=(0, 0, 0), font=scenes.font(size))
    return overlap(ink(np.asarray(reference).astype(np.int32), (255, 255, 255)), seen)


@pytest.mark.parametrize("letters, sizes, side", [((1, 3), (30, 40), None), ((1, 1), (40, 64), 224),
                                                 ((3, 6), (18, 40), "strip")])
def test_the_word_lesson_draws_its_answer_alone_at_a_size_in_range(tmp_path, letters, sizes, side):
    import json

    from qwen2vl.demo.dataset import write_word_set

    strip = side == "strip"
    lines = [json.loads(t) for t in open(write_word_set(tmp_path, 16, 3, letters, sizes, None if strip else side,
                                                        strip=strip))]
    drawn_as_asked, lengths, picture_sizes = 0, set(), set()
    for line in lines:
        (question, answer) = [m["content"] for m in line["messages"]]
        assert question == "<image>What does the text say?"
        assert set(answer) <= set(scenes.WORD_CHARS) and letters[0] <= len(answer) <= letters[1]
        lengths.add(len(answer))
        image = Image.open(tmp_path / line["images"][0])
        picture_sizes.add(image.size)
        pixels = np.asarray(image).astype(np.int32)
        values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        background = values[counts.argmax()]
        assert all(200 <= c <= 255 for c in background)
        assert not regions(image)  # no shapes: the word alone

        seen = ink(pixels, background)
        best = max(range(sizes[0] - 6, sizes[1] + 7), key=lambda s: likeness(seen, answer, s))
        other = answer[1:] + answer[0] if len(set(answer)) > 1 else ("A" if answer[0] != "A" else "B") * len(answer)
        if sizes[0] <= best <= sizes[1] and likeness(seen, answer, best) >= 0.9 > likeness(seen, other, best):
            drawn_as_asked += 1
    assert drawn_as_asked >= 0.8 * len(lines)  # font hinting moves an edge pixel now and then
    assert lengths == set(range(letters[0], letters[1] + 1))
    if strip:  # just big enough: 56 px tall, whole tokens wide
        assert {h for _, h in picture_sizes} == {56} and all(w % 28 == 0 for w, _ in picture_sizes)
        assert len(picture_sizes) > 3
    else:
        assert picture_sizes == {(side, side)} if side else len(picture_sizes) > 6


def test_the_word_lesson_refuses_words_no_picture_holds_instead_of_drawing_forever(tmp_path, capsys):
    from qwen2vl.demo.dataset import main, write_word_set

    with pytest.raises(ValueError, match="more than the 112 x 112 px pictures hold"):
        write_word_set(tmp_path, 2, 1, (6, 6), (60, 64), side=112)
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        write_word_set(tmp_path, 2, 1, (4, 2), (20, 30))
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--words", "6", "--font", "200-220", "--cases", "2"])
    assert "more than the 448 x 448 px pictures hold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="more than a strip.s 56 px"):
        write_word_set(tmp_path, 2, 1, (3, 6), (40, 80), strip=True)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--words", "3-6", "--strip", "--side", "224", "--cases", "2"])
    assert "--strip goes with --words, without --side" in capsys.readouterr().err
