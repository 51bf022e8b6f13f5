"""The demo's tower lesson (qwen2vl/demo/tower.py): each merged token's label is the shape drawn at
that token's place in the processed picture, and a lesson changes the tower and nothing else."""

from __future__ import annotations

import random

import torch
from safetensors.torch import load_file

from qwen2vl.demo.scenes import COLORS, SHAPES
from qwen2vl.demo.tower import CLASSES, render, teach_tower
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.checkpoint import save_full

DEMO = resolve_model_path("demo")


def token_pixels(pixels: torch.Tensor, token: int, processor: Processor) -> torch.Tensor:
    """(3, n) RGB values in 0-255 of the merged token's patches, as the processor normalised them."""
    v = processor.vision
    patches = pixels[token * v.merge_size**2:(token + 1) * v.merge_size**2]
    rgb = patches.reshape(-1, 3, v.temporal_patch_size, v.patch_size, v.patch_size).transpose(0, 1).reshape(3, -1)
    mean, std = torch.tensor(v.image_mean)[:, None], torch.tensor(v.image_std)[:, None]
    return (rgb * std + mean) * 255


def test_a_labelled_token_holds_its_shapes_colour_in_the_processed_picture():
    processor = Processor.from_pretrained(DEMO)
    rng = random.Random(3)
    checked = 0
    for _ in range(12):
        pixels, grid, labels = render(rng, processor)
        assert labels.numel() == int(grid.prod()) // processor.vision.merge_size**2
        for token in labels.nonzero().flatten().tolist():
            color = list(COLORS.values())[(int(labels[token]) - 1) % len(COLORS)]
            closest = (token_pixels(pixels, token, processor) - torch.tensor(color)[:, None]).abs().amax(0).min()
            assert closest < 12, (token, color, float(closest))  # the shape's own fill is there
            checked += 1
    assert checked > 20
    assert CLASSES == 1 + len(SHAPES) * len(COLORS)


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
