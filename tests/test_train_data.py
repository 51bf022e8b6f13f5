"""Training data: bad rows are errors naming the file, line and problem; labels cover exactly the
assistant answers and their <|im_end|>; ids are the inference processor's; packing shifts per sequence."""

from __future__ import annotations

import json

import pytest
import torch

from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import epoch_order, pack
from qwen2vl.train.data import DataError, read_rows
from qwen2vl.train.examples import IGNORE, encode_row
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir
from tests.helpers.training import PREPROCESSOR, sample_rows, write_image, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def user(content):
    return {"role": "user", "content": content}


def answer(content="ok"):
    return {"role": "assistant", "content": content}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A processor folder (tokenizer + preprocessor + config for the ids) with a few pictures."""
    from tests.helpers.checkpoints import tiny_config

    folder = tmp_path_factory.mktemp("train_data")
    for f in qwen_tokenizer_dir().iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (folder / "config.json").write_text(json.dumps(tiny_config(vocab_size=151936).to_dict()))
    for i in range(4):
        write_image(folder / f"f{i}.png", 10 + i, 84, 56)
    return folder


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def config(folder):
    from qwen2vl.config import Qwen2VLConfig

    return Qwen2VLConfig.from_pretrained(folder)


BAD_ROWS = [
    ('{"messages": [', "not valid JSON"),
    ({"images": []}, "missing 'messages'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [user("<image><image>two?"), answer()], "images": ["f0.png"]},
     "2 <image> tag(s) in the messages but 1 entry in 'images'"),
    ({"messages": [user("one?"), answer()], "images": ["f0.png"]}, "0 <image> tag(s) in the messages but 1 entry"),
    ({"messages": [user("<image>?"), answer()], "images": ["missing.png"]}, "image file not found: "),
    ({"messages": [user("<video>?"), answer()], "videos": [3]}, "videos[0] must be a path or a list of frame paths"),
    ({"messages": [{"role": "robot", "content": "x"}, answer()]}, "messages[0].role: must be one of"),
    ({"messages": [user("hi")]}, "no assistant message to learn from"),
    ({"messages": [user("hi"), answer("")]}, "message 1 (assistant) has no text"),
    ({"messages": [user("hi"), answer("<image>")], "images": ["f0.png"]}, "answers must be text"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown 'from' 'bot'"),
    ({"messages": [user([{"type": "image", "image": "f0.png", "max_pixels": -1}]), answer()]},
     "max_pixels: must be a positive number"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_a_bad_row_is_an_error_naming_its_line(folder, row, message):
    path = write_jsonl(folder / "bad.jsonl", [GOOD, "", row, GOOD])  # the bad row is line 3
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)


def test_an_answer_before_any_question_is_an_error_at_encoding(folder, processor, config):
    path = write_jsonl(folder / "first.jsonl", [{"messages": [answer("hi"), user("?"), answer()]}])
    (row,) = read_rows(path)
    with pytest.raises(DataError, match=f"{path}:1: message 0 is an assistant answer to nothing"):
        encode_row(row, processor, config)


def spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of trained positions."""
    trained = (labels != IGNORE).tolist() + [False]
    out, start = [], None
    for i, t in enumerate(trained):
        if t and start is None:
            start = i
        elif not t and start is not None:
            out.append((start, i))
            start = None
    return out


def test_labels_are_the_answers_and_ids_are_what_inference_sees(folder, processor, config):
    rows = read_rows(write_jsonl(folder / "data.jsonl", sample_rows(folder)))
    answers = [["A noisy square."], ["The first is taller.", "Yes."], ["Hi!"], ["Wide noise."]]
    for row, want in zip(rows, answers):
        e = encode_row(row, processor, config)
        assert torch.equal(e.input_ids, processor(row.messages)["input_ids"])
        got = [processor.decode(e.labels[s:t].tolist(), skip_special_tokens=False) for s, t in spans(e.labels)]
        assert got == [a + "<|im_end|>" for a in want]
        assert torch.equal(e.labels[e.labels != IGNORE], e.input_ids[e.labels != IGNORE])
        # each answer starts right after the ids inference would build to ask for it
        k = [i for i, m in enumerate(row.messages) if m["role"] == "assistant"][0]
        prompt = processor(row.messages[:k], add_generation_prompt=True)["input_ids"]
        assert spans(e.labels)[0][0] == len(prompt) and torch.equal(e.input_ids[: len(prompt)], prompt)
        assert e.positions.shape == (3, len(e))


def test_video_frames_and_pixel_limits(folder, processor, config):
    frames = [f"f{i}.png" for i in range(4)]
    rows = [{"messages": [user("<image>then<video>"), answer()], "images": ["f0.png"], "videos": [frames]},
            {"messages": [user("<image>?"), answer()], "images": ["f0.png"]}]
    path = write_jsonl(folder / "video.jsonl", rows)
    video, image = [encode_row(r, processor, config) for r in read_rows(path)]
    t, h, w = video.video_grid_thw.tolist()[0]
    assert t == 2 and int((video.input_ids == config.video_token_id).sum()) == t * h * w // 4
    assert video.pixel_values_videos.shape[0] == t * h * w
    (small,) = [encode_row(r, processor, config) for r in read_rows(path, max_pixels=56 * 56)[1:]]
    assert image.image_grid_thw.tolist() == [[1, 4, 6]] and small.image_grid_thw.tolist() == [[1, 2, 4]]


def test_packing_shifts_labels_within_each_sequence(folder, processor, config):
    rows = read_rows(write_jsonl(folder / "data.jsonl", sample_rows(folder)))
    examples = [encode_row(r, processor, config) for r in rows]
    batch = pack(examples)
    assert batch.cu_seqlens == [0] + torch.tensor([len(e) for e in examples]).cumsum(0).tolist()
    for e, s, t in zip(examples, batch.cu_seqlens, batch.cu_seqlens[1:]):
        assert torch.equal(batch.targets[s : t - 1], e.labels[1:]) and batch.targets[t - 1] == IGNORE
    assert batch.pixel_values.shape[0] == sum(int(e.image_grid_thw.prod(-1).sum()) for e in examples
                                              if e.image_grid_thw is not None)


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert epoch_order(10, 3, seed=1, epoch=0) == epoch_order(10, 3, seed=1, epoch=0)
    assert epoch_order(10, 3, seed=1, epoch=0) != epoch_order(10, 3, seed=1, epoch=1)
    assert sorted(i for b in epoch_order(10, 3, 1, 0) for i in b) == list(range(10))
    assert [len(b) for b in epoch_order(10, 3, 1, 0)] == [3, 3, 3, 1]
