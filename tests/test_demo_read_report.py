"""The reading report (qwen2vl/demo/read_report.py): characters are counted in place against the word, and its
strips are the ones the dataset writes for the same seed."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from qwen2vl.demo.lessons import write_word_set
from qwen2vl.demo.read_report import format_reading, reading, strip_cases
from qwen2vl.demo.tasks import TEXT_QUESTION


def test_characters_are_counted_in_place():
    report = reading(["PKLCT4", "QVXY", "A7B"], ["PKLC", " QVXY\n", "7AB"])
    assert report == {"words": 3, "characters": 13, "in place": 4 + 4 + 1, "first": 2, "whole": 1}
    assert format_reading("m", report) == ("m: 9 of 13 characters in place (69.2%), 2 of 3 first characters, "
                                           "1 words whole (33.3%)")


def test_an_answer_longer_than_the_word_gains_nothing():
    assert reading(["ABC"], ["ABCDEF"])["in place"] == 3
    assert reading(["ABC"], ["ABCDEF"])["whole"] == 0


def test_strips_are_the_datasets_own(tmp_path):
    path = write_word_set(tmp_path, 4, seed=9602, strip=True)
    cases = strip_cases(9602, 4)
    for case, line in zip(cases, path.read_text().splitlines(), strict=True):
        row = json.loads(line)
        assert row["messages"][0]["content"] == "<image>" + TEXT_QUESTION == "<image>" + case.question
        assert row["messages"][1]["content"] == case.answer
        written = np.asarray(Image.open(tmp_path / row["images"][0]).convert("RGB"))
        assert np.array_equal(written, np.asarray(case.images[0].convert("RGB")))
