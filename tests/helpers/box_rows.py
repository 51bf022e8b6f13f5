"""A packed batch with box questions, for the box lessons' tests (box_attention, box_probe)."""

from __future__ import annotations

import json

import torch

from qwen2vl.demo.scenes import Shape, draw_scene
from qwen2vl.demo.tasks import box_answer
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import pack
from qwen2vl.train.data import read_rows
from qwen2vl.train.examples import encode_row

DEMO = resolve_model_path("demo")
WIDTH, HEIGHT = 280, 196  # multiples of 28: the processor keeps the size, a grid of 7 x 10 merged tokens
RED, BLUE = Shape("square", "red", 20, 20, 45), Shape("circle", "blue", 180, 100, 60)  # no edge on a cell centre


def batch_of(tmp_path):
    """A packed batch: a row of two small pictures (no box), then one picture asked both shapes' boxes."""
    draw_scene(WIDTH, HEIGHT, (230, 230, 230), [RED, BLUE]).save(tmp_path / "a.png")
    draw_scene(168, 112, (230, 230, 230), [RED]).save(tmp_path / "b.png")  # another grid: the count of pictures matters
    rows = [{"messages": [{"role": "user", "content": "<image><image>Which image has more shapes?"},
                          {"role": "assistant", "content": "first"}], "images": ["b.png", "b.png"]},
            {"messages": [{"role": "user", "content": "<image>Where is the red square?"},
                          {"role": "assistant", "content": box_answer(RED, WIDTH, HEIGHT)},
                          {"role": "user", "content": "Where is the blue circle?"},
                          {"role": "assistant", "content": box_answer(BLUE, WIDTH, HEIGHT)}], "images": ["a.png"]}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    processor = Processor.from_pretrained(DEMO)
    model = Qwen2VL.from_pretrained(DEMO, dtype=torch.float32)
    batch = pack([encode_row(r, processor, model.config) for r in read_rows(tmp_path / "rows.jsonl")])
    return batch, processor.tokenizer, model
