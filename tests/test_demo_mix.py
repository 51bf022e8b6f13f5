"""`python -m qwen2vl.demo.mix` joins line files the way the demo's recipes need: every picture still
found from the new file's folder, N lines drawn, the same bytes from the same seed, boxes after a line's
first question left out on request."""

import json

import pytest

from qwen2vl.demo.mix import main


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def turn(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture
def lessons(tmp_path):
    """Two lesson folders, each with its pictures and frames, and one file beside the output."""
    for name in ("a", "b"):
        (tmp_path / name / "img").mkdir(parents=True)
        for i in range(4):
            (tmp_path / name / "img" / f"{i}.png").write_bytes(b"png")
    write_lines(tmp_path / "a" / "train.jsonl", [
        {"messages": turn("<image>What color?", "red") + turn("Where?", "<|box_start|>(1,2),(3,4)<|box_end|>"),
         "images": [f"img/{i}.png"]} for i in range(4)])
    write_lines(tmp_path / "b" / "train.jsonl", [
        {"messages": turn("<video>Which way?", "left"), "videos": [[f"img/{i}.png", f"img/{(i + 1) % 4}.png"]]}
        for i in range(4)])
    write_lines(tmp_path / "here.jsonl", [{"messages": turn("<image>How many?", "2"), "images": ["a/img/0.png"]}])
    write_lines(tmp_path / "b" / "far.jsonl", [{"messages": turn("<image><image>Which?", "first"),
                                                "images": [str(tmp_path / "a" / "img" / "1.png"), "https://x.org/2.png",
                                                           "data:image/png;base64,iVBORw0KGgo="]}])
    return tmp_path


def picture_paths(row):
    return row.get("images", []) + [p for video in row.get("videos", []) for p in video]


def test_every_line_comes_once_and_its_pictures_are_found_from_the_new_files_folder(lessons):
    out = lessons / "all.jsonl"
    main([str(out), "3", str(lessons / "a" / "train.jsonl"), str(lessons / "b" / "train.jsonl"),
          str(lessons / "here.jsonl")])
    rows = [json.loads(t) for t in out.read_text().splitlines()]
    assert len(rows) == 9
    assert sorted(r["messages"][1]["content"] for r in rows) == ["2"] + ["left"] * 4 + ["red"] * 4
    for row in rows:
        for path in picture_paths(row):
            assert (lessons / path).is_file(), path
    # a line from the output's own folder is kept as written
    assert (lessons / "here.jsonl").read_text().strip() in out.read_text().splitlines()


def test_absolute_paths_urls_and_data_uris_are_kept(lessons):
    out = lessons / "all.jsonl"
    main([str(out), "0", str(lessons / "b" / "far.jsonl")])
    (row,) = [json.loads(t) for t in out.read_text().splitlines()]
    assert row["images"] == [str(lessons / "a" / "img" / "1.png"), "https://x.org/2.png",
                             "data:image/png;base64,iVBORw0KGgo="]


def test_n_lines_are_drawn_and_the_same_seed_writes_the_same_bytes(lessons):
    files = [str(lessons / "a" / "train.jsonl") + ":2", str(lessons / "b" / "train.jsonl")]
    main([str(lessons / "one.jsonl"), "5", *files])
    main([str(lessons / "two.jsonl"), "5", *files])
    main([str(lessons / "other.jsonl"), "6", *files])
    one = (lessons / "one.jsonl").read_text()
    assert one == (lessons / "two.jsonl").read_text()
    assert one != (lessons / "other.jsonl").read_text()
    assert sum('"red"' in line for line in one.splitlines()) == 2
    assert len(one.splitlines()) == 6


def test_extra_boxes_are_left_out_on_request_and_the_first_question_kept(lessons):
    write_lines(lessons / "c" / "train.jsonl", [
        {"messages": turn("<image>Where?", "<|box_start|>(1,2),(3,4)<|box_end|>") + turn("Color?", "red"),
         "images": ["img/0.png"]}])
    out = lessons / "all.jsonl"
    main(["--drop-extra-boxes", str(out), "0", str(lessons / "a" / "train.jsonl"), str(lessons / "c" / "train.jsonl")])
    rows = [json.loads(t) for t in out.read_text().splitlines()]
    answers = sorted(tuple(m["content"] for m in r["messages"][1::2]) for r in rows)
    assert answers == [("<|box_start|>(1,2),(3,4)<|box_end|>", "red")] + [("red",)] * 4


def test_a_missing_file_or_too_many_lines_is_named(lessons, capsys):
    with pytest.raises(SystemExit, match="nope.jsonl is not a file"):
        main([str(lessons / "x.jsonl"), "0", str(lessons / "nope.jsonl")])
    with pytest.raises(SystemExit, match="at most 4"):
        main([str(lessons / "x.jsonl"), "0", str(lessons / "a" / "train.jsonl") + ":9"])
