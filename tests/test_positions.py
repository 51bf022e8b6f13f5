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


CFG25 = Qwen2VLConfig(text=TextConfig(), vision=VisionConfig(family="qwen2_5_vl", window_size=112, tokens_per_second=2),
                      image_token_id=9, video_token_id=8, model_type="qwen2_5_vl")


def test_qwen2_5_docstring_example():
    # [T V*4 T], video LLM grid (2, 1, 2) = processor grid (2, 2, 4), 1 s a grid step, 2 positions a second
    pos, delta = mrope_positions([T] + [V] * 4 + [T], None, [[2, 2, 4]], CFG25, [1.0])
    assert pos.tolist() == [[0, 1, 1, 3, 3, 4], [0, 1, 1, 1, 1, 4], [0, 1, 2, 1, 2, 4]]
    assert delta == 5 - 6


@pytest.mark.parametrize("seconds, time", [
    (None, [0, 2, 4, 6]),  # no seconds given: 1.0, as the reference defaults
    ([0.25], [0, 0, 1, 1]),  # int() truncates
    ([2 / 3], [0, 1, 2, 4]),  # 3 fps: 1.33, 2.67, then float32(3 * float32(2/3)) = 2.0 exactly -> 4
    ([0.0], [0, 0, 0, 0]),
])
def test_qwen2_5_video_time_steps(seconds, time):
    ids = [T] + [V] * 4 + [T]
    pos, _ = mrope_positions(ids, None, [[4, 2, 2]], CFG25, seconds)  # LLM grid (4, 1, 1)
    assert (pos[0, 1:5] - 1).tolist() == time
    assert pos[0, 5] == 1 + time[-1] + 1
    assert mrope_positions(ids, None, [[4, 2, 2]], CFG, seconds)[0][0, 1:5].tolist() == [1, 2, 3, 4]  # Qwen2-VL


@pytest.mark.parametrize("seconds, message", [([1.0, 2.0], "2 second_per_grid_ts values for 1 videos"),
                                              ([-1.0], "finite and >= 0"), ([float("nan")], "finite and >= 0")])
def test_bad_seconds_are_errors(seconds, message):
    with pytest.raises(ValueError, match=message):
        mrope_positions([T] + [V] * 4, None, [[4, 2, 2]], CFG25, seconds)
