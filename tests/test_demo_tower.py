"""The demo's tower lesson (qwen2vl/demo/tower.py, tower_cases.py): each merged token's labels are the
shape, the motion and the characters drawn at that token's place in the processed picture or video,
and a lesson changes the tower and nothing else."""

from __future__ import annotations

import random
import re

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.demo import tower_cases
from qwen2vl.demo.scenes import COLORS, SHAPES, TEXT_COLOR
from qwen2vl.demo.tasks import DIRECTIONS, box_answer
from qwen2vl.demo.tower import drift, score, teach_tower
from qwen2vl.demo.tower_cases import CHARS, SHAPE_CLASSES, SLOTS
from qwen2vl.demo.tower_heads import Heads, iou, token_places
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.checkpoint import save_full

DEMO = resolve_model_path("demo")


def token_pixels(pixels: torch.Tensor, token: int, processor: Processor, frame: int = 0) -> torch.Tensor:
    """(3, n) RGB values in 0-255 of the merged token's patches, as the processor normalised them, in
    `frame` (0 or 1) of the token's frame pair."""
    v = processor.vision
    patches = pixels[token * v.merge_size**2:(token + 1) * v.merge_size**2]
    rgb = patches.reshape(-1, 3, v.temporal_patch_size, v.patch_size, v.patch_size)[:, :, frame]
    mean, std = torch.tensor(v.image_mean)[:, None], torch.tensor(v.image_std)[:, None]
    return (rgb.transpose(0, 1).reshape(3, -1) * std + mean) * 255


def closest(pixels, token, processor, color, frame=0) -> float:
    return float((token_pixels(pixels, token, processor, frame) - torch.tensor(color)[:, None]).abs().amax(0).min())


def shape_color(label: int) -> tuple[int, int, int]:
    return list(COLORS.values())[(label - 1) % len(COLORS)]


def test_a_labelled_token_holds_its_shapes_colour_in_the_processed_picture():
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(3)
    checked = 0
    for _ in range(12):
        case = tower_cases.picture(rng, processor)
        assert case.shapes.numel() == int(case.grid.prod()) // processor.vision.merge_size**2
        assert not case.motion.any() and not case.chars.any()
        for token in case.shapes.nonzero().flatten().tolist():
            color = shape_color(int(case.shapes[token]))
            assert closest(case.pixels, token, processor, color) < 12, token  # the shape's own fill is there
            checked += 1
    assert checked > 20
    assert SHAPE_CLASSES == 1 + len(SHAPES) * len(COLORS)


def video_and_case(rng: random.Random, processor: Processor):
    """The lesson's next video and the same video as the suite asks about it (drawn from the same state)."""
    state = rng.getstate()
    case = tower_cases.video(rng, processor)
    rng.setstate(state)
    return case, tower_cases.tasks.video_case(rng)


def test_a_moving_shape_is_labelled_with_its_direction_where_it_is_in_each_frame_pair():
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(4)
    for _ in range(8):
        case, answer = video_and_case(rng, processor)
        pairs = int(case.grid[0, 0])
        moving = case.motion.nonzero().flatten().tolist()
        assert len(moving) == len(answer.images) // 2  # one token a pair (an odd count's last pair is still)
        assert {int(case.motion[t]) for t in moving} == {1 + list(DIRECTIONS).index(answer.answer)}
        per_pair = case.shapes.numel() // pairs
        assert sorted(t // per_pair for t in moving) == list(range(len(moving)))
        color = shape_color(int(case.shapes[moving[0]]))
        assert COLORS[answer.info["path"][0].color] == color
        for token in moving:  # the shape is drawn in that token in one of the pair's frames at least
            assert min(closest(case.pixels, token, processor, color, frame) for frame in (0, 1)) < 12


@pytest.mark.parametrize("kind", ["word", "strip"])
def test_each_character_of_a_word_is_labelled_in_order_where_it_is_drawn(kind):
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(5)
    whole = 0
    for _ in range(20):
        state = rng.getstate()
        case = tower_cases.KINDS[kind](rng, processor)
        rng.setstate(state)
        word = (tower_cases.tasks.text_case(rng).info["word"] if kind == "word"
                else tower_cases.scenes.random_word(rng, (3, 6)))
        if kind == "strip":  # a strip is 56 px tall, two rows of tokens: nothing but the word
            assert case.grid[0, 1] == 4 and not case.shapes.any()
        read = "".join(CHARS[c - 1] for c in case.chars.flatten().tolist() if c)  # raster order, slot by slot
        whole += read == word
        assert len(read) >= len(word) - 1 and all(c in word for c in read), (read, word)  # two may share a slot
        for token in case.chars.any(-1).nonzero().flatten().tolist():
            assert closest(case.pixels, token, processor, TEXT_COLOR) < 60  # ink there (antialiased, resized)
    assert whole >= 17
    assert case.chars.shape[-1] == SLOTS


def test_the_lesson_trains_the_tower_and_keeps_the_decoder(tmp_path):
    lines = []
    model = teach_tower(DEMO, steps=2, batch_size=2, held_out=2, log=lines.append)
    assert lines[-1].startswith("step 2/2 | loss ")
    out = save_full(model, DEMO, tmp_path / "taught", torch.bfloat16)
    before, after = load_file(DEMO / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != name.startswith("visual."), name  # every tower tensor new, every decoder one kept
    Qwen2VL.from_pretrained(out, dtype=torch.float32)


def test_workers_draw_the_pictures_the_lesson_draws_without_them():
    towers = [teach_tower(DEMO, steps=2, batch_size=2, held_out=1, workers=workers, log=lambda _: None).visual
              for workers in (0, 2)]
    for (name, a), b in zip(towers[0].state_dict().items(), towers[1].state_dict().values()):
        assert torch.equal(a, b), name


def labelled_scenes(seed: int, specs: list[tuple[str, str]], tries: int = 6):
    """Up to `tries` pictures of `specs` on a plain background: (shapes, width, height, grid_thw, empty Labels)."""
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(seed)
    for _ in range(tries):
        width, height = tower_cases.random_size(rng)
        shapes = tower_cases.place(rng, width, height, specs)
        if shapes is None:
            continue
        image = tower_cases.draw_scene(width, height, (230, 230, 230), shapes)
        _, grid, (t, rows, cols) = tower_cases._draw(processor, {"type": "image", "image": image})
        yield shapes, width, height, grid, tower_cases.Labels(t, rows, cols, width, height)


def test_token_places_are_the_cells_of_the_shapes_centres():
    """The place head's targets: the cell of the token holding a shape's centre contains that centre."""
    checked = 0
    for shapes, width, height, grid, labels in labelled_scenes(5, [("circle", "red"), ("square", "blue")]):
        rows, cols = labels.rows, labels.cols
        places = token_places(grid)
        assert places.shape == (rows * cols, 2)
        for s in shapes:
            token = labels.shape(0, s)
            x, y = (s.x + s.side / 2) / width, (s.y + s.side / 2) / height
            assert abs(places[token, 0] - x) <= 0.5 / cols + 1e-6 and abs(places[token, 1] - y) <= 0.5 / rows + 1e-6
            checked += 1
    assert checked >= 6


def test_the_place_head_is_taught_only_when_weighted():
    lines = []
    teach_tower(DEMO, steps=2, batch_size=2, held_out=2, log=lines.append, place_weight=1.0)
    assert "place R^2" in lines[-1]
    processor = Processor.from_pretrained(DEMO)
    case = tower_cases.picture(random.Random(6), processor)
    tokens = torch.randn(case.shapes.numel(), 256)
    heads = Heads(256, "cpu", place_weight=0.0)
    weighted = Heads(256, "cpu", place_weight=1.0)
    weighted.load_state_dict(heads.state_dict())
    held = case.shapes > 0  # a picture: no characters
    error = weighted.place(tokens)[held] - token_places(case.grid)[held]
    torch.testing.assert_close(weighted.loss(tokens, case) - heads.loss(tokens, case), (error**2).mean(),
                               rtol=1e-5, atol=1e-6)


def test_a_still_shapes_box_is_its_square_in_tokens_from_its_centres_token():
    checked = 0
    for shapes, width, height, _, labels in labelled_scenes(7, [("circle", "red"), ("triangle", "green"),
                                                                ("square", "blue")]):
        rows, cols = labels.rows, labels.cols
        for s in shapes:
            token = labels.shape(0, s)
            col, row = token % cols, token // cols
            box = labels.boxes[token] + torch.tensor([col, row, col, row])  # tokens from the picture's corner
            px = box * torch.tensor([width / cols, height / rows] * 2)
            torch.testing.assert_close(px, torch.tensor(s.box, dtype=torch.float32), rtol=0, atol=1e-3)
            centre = (labels.boxes[token, :2] + labels.boxes[token, 2:]) / 2
            assert ((centre >= 0) & (centre < 1)).all()  # the centre lies in the token's own cell
            checked += 1
        assert int((~labels.boxes[:, 0].isnan()).sum()) == len(shapes)
    assert checked >= 9


def picture_and_tokens(seed: int):
    """A suite picture of two shapes or more, and random tokens (256 wide) in place of a tower's."""
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(seed)
    case = tower_cases.picture(rng, processor)
    while int((case.shapes > 0).sum()) < 2:
        case = tower_cases.picture(rng, processor)
    return case, torch.randn(case.shapes.numel(), 256)


def test_a_still_shapes_digits_are_the_hundreds_and_tens_its_grounding_answer_writes():
    checked = 0
    for shapes, width, height, _, labels in labelled_scenes(17, [("square", "red"), ("circle", "purple")]):
        for s in shapes:
            token = labels.shape(0, s)
            numbers = re.findall(r"\d+", box_answer(s, width, height).split("<|box_start|>")[1])
            assert labels.digits[token].tolist() == [d for n in numbers for d in (int(n) // 100, int(n) // 10 % 10)]
            checked += 1
        assert int((labels.digits != tower_cases.IGNORE).all(dim=1).sum()) == len(shapes)
        assert int((labels.digits != tower_cases.IGNORE).any(dim=1).sum()) == len(shapes)
    assert checked >= 6


def test_the_digit_head_is_made_and_taught_only_when_weighted_and_reads_normalised_tokens():
    case, tokens = picture_and_tokens(18)
    heads, weighted = Heads(256, "cpu"), Heads(256, "cpu", digit_weight=3.0)
    assert not hasattr(heads, "digits")
    weighted.load_state_dict(heads.state_dict(), strict=False)
    still = case.digits[:, 0] != tower_cases.IGNORE
    logits = weighted.digit_logits(tokens)
    torch.testing.assert_close(weighted.digit_logits(tokens * 7), logits)  # the scale of a token does not count
    expected = 3 * torch.nn.functional.cross_entropy(logits[still].flatten(0, 1), case.digits[still].flatten())
    torch.testing.assert_close(weighted.loss(tokens, case) - heads.loss(tokens, case), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a head that answers the first still shape's digits whatever the token
        weighted.digits.weight.zero_()
        weighted.digits.bias.copy_(torch.nn.functional.one_hot(case.digits[still][0], 11).flatten() * 10.0)
    named = score(lambda pixels, grid: tokens, weighted, [case])
    first = case.digits[still][0]
    shapes = int(still.sum()) * 4
    hundreds = int((case.digits[still][:, 0::2] == first[0::2]).sum()) / shapes
    tens = int((case.digits[still][:, 1::2] == first[1::2]).sum()) / shapes
    assert (named["hundreds"], named["tens"]) == (hundreds, tens)
    assert hundreds > 0


def test_a_moving_shape_has_no_box_and_each_still_one_has_one_in_every_frame_pair():
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(9)
    for _ in range(4):
        case, answer = video_and_case(rng, processor)
        still = answer.info["shapes"]
        boxed = ~case.boxes[:, 0].isnan()
        assert int(boxed.sum()) == len(still) * int(case.grid[0, 0])
        assert not boxed[case.motion > 0].any()


def test_iou_of_known_boxes():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 0, 3, 2], [0, 0, 1, 1], [2, 2, 3, 3]])
    torch.testing.assert_close(iou(a, b), torch.tensor([1 / 3, 1.0, 0.0]))


def test_the_box_head_is_taught_only_when_weighted_and_scored_on_still_shapes():
    case, tokens = picture_and_tokens(8)
    heads, weighted = Heads(256, "cpu"), Heads(256, "cpu", box_weight=2.0)
    weighted.load_state_dict(heads.state_dict())
    boxed = ~case.boxes[:, 0].isnan()
    error = weighted.box(tokens)[boxed] - case.boxes[boxed]
    torch.testing.assert_close(weighted.loss(tokens, case) - heads.loss(tokens, case), 2 * (error**2).mean(),
                               rtol=1e-5, atol=1e-6)
    token = int(boxed.nonzero()[0])
    boxes = torch.full_like(case.boxes, float("nan"))
    boxes[token] = case.boxes[token]
    one = tower_cases.Drawn(case.pixels, case.grid, case.shapes, case.motion, case.chars, boxes, case.digits)
    tower = lambda pixels, grid: tokens  # noqa: E731
    for shift, boxed_share, off in ((0.0, 1.0, 0.0), (10.0, 0.0, 5.0)):  # 10 tokens right: x edges off by 10
        with torch.no_grad():  # a head that answers this box whatever the token
            weighted.box.weight.zero_()
            weighted.box.bias.copy_(case.boxes[token] + torch.tensor([shift, 0, shift, 0]))
        named = score(tower, weighted, [one])
        assert named["boxed"] == boxed_share and abs(named["box error"] - off) < 1e-4


def test_keep_tower_starts_from_the_checkpoints_tower():
    kept = teach_tower(DEMO, steps=2, lr=0.0, head_lr=1e-2, batch_size=1, held_out=1, keep_tower=True,
                       log=lambda _: None)  # the heads learn, the tower at 0 does not
    fresh = teach_tower(DEMO, steps=1, lr=0.0, batch_size=1, held_out=1, log=lambda _: None)
    base = Qwen2VL.from_pretrained(DEMO, dtype=torch.float32).visual.state_dict()
    for name, tensor in base.items():
        assert torch.equal(kept.visual.state_dict()[name], tensor), name
    assert not torch.equal(fresh.visual.state_dict()["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    taught = teach_tower(DEMO, steps=1, batch_size=1, held_out=1, keep_tower=True, log=lambda _: None).visual
    moved = [name for name, tensor in base.items() if not torch.equal(taught.state_dict()[name], tensor)]
    assert len(moved) == len(base), sorted(set(base) - set(moved))  # the kept tower learns: every tensor moves


def test_heads_first_holds_the_kept_tower_still_for_those_steps_only():
    base = Qwen2VL.from_pretrained(DEMO, dtype=torch.float32).visual.state_dict()
    for heads_first, moves in ((2, False), (1, True)):
        taught = teach_tower(DEMO, steps=2, batch_size=1, held_out=1, keep_tower=True, heads_first=heads_first,
                             log=lambda _: None).visual.state_dict()
        assert (not torch.equal(taught["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])) == moves


def test_drift_is_the_squared_change_of_the_tokens_without_characters_over_their_old_norm():
    processor = Processor.from_pretrained(DEMO)
    case = tower_cases.KINDS["word"](random.Random(3), processor)
    held = (case.chars == 0).all(-1)
    assert held.any() and not held.all()
    old = torch.randn(len(held), 8)
    assert float(drift(old.clone(), old, case)) == 0.0
    moved = old.clone()
    moved[~held] += 100.0  # the characters' tokens may move freely
    assert float(drift(moved, old, case)) == 0.0
    moved[held] *= 1.5  # the rest: (0.5 |old|)^2 / |old|^2
    assert float(drift(moved, old, case)) == pytest.approx(0.25)


def test_the_anchor_holds_a_kept_towers_shape_tokens_and_needs_a_kept_tower():
    with pytest.raises(ValueError, match="--keep-tower"):
        teach_tower(DEMO, steps=1, batch_size=1, held_out=1, anchor_weight=1.0, log=lambda _: None)
    processor = Processor.from_pretrained(DEMO)
    case = tower_cases.KINDS["picture"](random.Random(9), processor)
    base = Qwen2VL.from_pretrained(DEMO, dtype=torch.float32).visual
    moved, lines = {}, []
    for weight in (0.0, 1000.0):
        tower = teach_tower(DEMO, steps=4, batch_size=2, held_out=1, keep_tower=True, anchor_weight=weight,
                            mix={"picture": 1.0}, log=lines.append).visual.float()
        with torch.no_grad():
            moved[weight] = float(drift(tower(case.pixels, case.grid), base(case.pixels, case.grid), case))
    assert "| drift " in lines[-1] and "| drift " not in lines[0]
    assert 0 < moved[1000.0] < moved[0.0] / 2, moved
