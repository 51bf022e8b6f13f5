"""The M-RoPE rule as a table of cases, including where transformers 5 departs from it."""

import pytest
import torch

from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl.positions import decode_positions, mrope_positions

CFG = Qwen2VLConfig(text=TextConfig(), vision=VisionConfig(), image_token_id=9, video_token_id=8)
T, I, V = 1, 9, 8  # a text token, an image pad, a video pad


def test_docstring_example():
    # [T T V*6 T T], image LLM grid (1, 2, 3) = processor grid (1, 4, 6)
    pos, delta = mrope_positions([T, T] + [I] * 6 + [T, T], [[1, 4, 6]], None, CFG)
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta == -3


def test_text_only_is_plain_1d():
    pos, delta = mrope_positions([T] * 5, None, None, CFG)
    assert pos.tolist() == [list(range(5))] * 3 and delta == 0


def test_long_video_advances_by_time_steps():
    # REFERENCE §2.4: grid (16, 4, 6) -> LLM grid (16, 2, 3). The original rule resumes text at
    # 4 + 16 = 20; transformers 5 (max(h, w) only) would resume at 7.
    ids = [T] * 4 + [V] * (16 * 2 * 3) + [T] * 2
    pos, delta = mrope_positions(ids, None, [[16, 4, 6]], CFG)
    assert pos[:, 4 + 96].tolist() == [20, 20, 20]
    assert pos[0, 4:100].max() == 4 + 15 and pos[1, 4:100].max() == 4 + 1 and pos[2, 4:100].max() == 4 + 2
    assert delta == 22 - len(ids)


def test_video_then_image_order():
    ids = [T] + [V] * 4 + [T] + [I] * 2 + [T]
    pos, _ = mrope_positions(ids, [[1, 2, 4]], [[4, 2, 2]], CFG)
    assert pos[:, 5].tolist() == [5, 5, 5]  # after the video: 1 + max(4, 1, 1)
    assert pos[:, 6:8].tolist() == [[6, 6], [6, 6], [6, 7]]
    assert pos[:, 8].tolist() == [8, 8, 8]


@pytest.mark.parametrize(
    "ids, images, message",
    [
        ([T, I, I, T], None, "more image placeholder runs"),
        ([T, I, T], [[1, 2, 4]], "should hold 2 pad tokens"),
        ([T, T], [[1, 2, 2]], "1 image grids given but 0"),
    ],
)
def test_mismatched_grids_are_errors(ids, images, message):
    with pytest.raises(ValueError, match=message):
        mrope_positions(ids, images, None, CFG)


def test_decode_positions_use_delta():
    assert decode_positions(10, -3).tolist() == [[7], [7], [7]]
    assert torch.equal(decode_positions(0, 0), torch.zeros(3, 1, dtype=torch.long))
