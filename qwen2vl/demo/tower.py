"""A lesson for the demo's vision tower alone: every merged token names the shape centred in it.

    python -m qwen2vl.demo.tower BASE OUT --steps 1800 [--seed 5] [--lr 1e-3] [--batch-size 16]
                                            [--device cuda] [--workers 8]

trains a fresh vision tower (random weights) on pictures of the suite, with a linear head on its
merged tokens that must name, for each token, the shape whose square's centre falls in it (one of
the 18 colour/kind pairs) or nothing, and writes BASE's checkpoint with that tower in OUT (the
decoder's weights as BASE has them; `qwen2vl train` then teaches the decoder to read the new tower).

Why (docs/demo.md, 2026-12-04): the curriculum's tower (stages 1-9) sees colours but not kinds, and
cannot learn them: its patch embedding projects every patch onto its colour with a norm ~7x a fresh
tower's, and neither a lesson through the decoder (800 steps of 16) nor a classifier trained on the
tower directly took lone shapes' kinds much past half. A fresh tower with one label per token
learns colour and kind at once, in the place the decoder needs them: 89% of held-out shapes named
after 1,000 steps of 16, 95% after 1,800 (measured with a version that cached 6,000 pictures).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from qwen2vl.demo.scenes import COLORS, SHAPES, Shape, draw_scene, place, random_background, random_size
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.checkpoint import save_full
from qwen2vl.train.feed import in_order
from qwen2vl.train.setup import random_model

CLASSES = 1 + len(SHAPES) * len(COLORS)  # nothing, then every (kind, colour)
NOTHING_WEIGHT = 0.2  # most tokens hold no shape's centre; at full weight "nothing" everywhere is a cheap minimum


def shape_class(shape: Shape) -> int:
    return 1 + SHAPES.index(shape.kind) * len(COLORS) + list(COLORS).index(shape.color)


def token_labels(shapes: list[Shape], width: int, height: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols,) class of each merged token, raster order: the shape whose square's centre lies in
    the token's cell of the picture (the processor resizes the whole picture onto the token grid)."""
    labels = torch.zeros(rows * cols, dtype=torch.long)
    for s in shapes:
        row = min(rows - 1, int((s.y + s.side / 2) * rows / height))
        col = min(cols - 1, int((s.x + s.side / 2) * cols / width))
        labels[row * cols + col] = shape_class(s)
    return labels


def render(rng: random.Random, processor: Processor):
    """A suite picture of 0-6 shapes: (pixel_values, grid_thw, token labels)."""
    while True:
        width, height = random_size(rng)
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 6))]
        shapes = place(rng, width, height, specs)
        if shapes is not None:
            break
    picture = draw_scene(width, height, random_background(rng), shapes)
    batch = processor([{"role": "user", "content": [{"type": "image", "image": picture}]}])
    grid = batch["image_grid_thw"]
    merge = processor.vision.merge_size
    rows, cols = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
    return batch["pixel_values"], grid, token_labels(shapes, width, height, rows, cols)


class Lesson(torch.utils.data.Dataset):
    """Item i: step i's pictures, packed (pixel_values, grid_thw, labels); drawn from (seed, i) alone,
    so worker processes can draw steps ahead."""

    def __init__(self, processor: Processor, steps: int, batch_size: int, seed: int):
        self.processor, self.steps, self.batch_size, self.seed = processor, steps, batch_size, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} of {self.steps}")
        rng = random.Random(f"tower lesson {self.seed} {step}")
        cases = [render(rng, self.processor) for _ in range(self.batch_size)]
        return tuple(torch.cat([c[k] for c in cases]) for k in range(3))


def score(tower: nn.Module, head: nn.Linear, cases: list) -> tuple[float, int]:
    """(share of shapes whose centre token is named right, tokens wrongly named a shape)."""
    right = shapes = false = 0
    device = head.weight.device
    with torch.no_grad():
        for pixels, grid, labels in cases:
            guess = head(tower(pixels.to(device), grid).float()).argmax(-1).cpu()
            held = labels > 0
            right += int((guess[held] == labels[held]).sum())
            shapes += int(held.sum())
            false += int((guess[~held] > 0).sum())
    return right / max(shapes, 1), false


def teach_tower(base: Path, steps: int, seed: int = 5, lr: float = 1e-3, batch_size: int = 16,
                held_out: int = 100, device: str = "cpu", workers: int = 0, log=None) -> Qwen2VL:
    """BASE's model with a fresh vision tower trained on token labels for `steps` AdamW steps
    (warmup, then cosine to a tenth); pictures drawn by `workers` processes ahead of the steps
    (0: between steps)."""
    log = log or (lambda text: print(text, flush=True))
    torch.manual_seed(seed)
    processor = Processor.from_pretrained(base)
    model = Qwen2VL.from_pretrained(base, dtype=torch.float32, device=device)
    model.visual = random_model(base, device).visual.float().train()
    tower = model.visual
    head = nn.Linear(model.config.vision.hidden_size, CLASSES, device=device)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = min(30, steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    weight = torch.ones(CLASSES, device=device)
    weight[0] = NOTHING_WEIGHT
    held_out = [render(random.Random(f"held-out {seed} {i}"), processor) for i in range(held_out)]
    lesson = in_order(Lesson(processor, steps, batch_size, seed), workers, seed)
    start = time.time()
    for step, (pixels, grids, labels) in enumerate(lesson, 1):
        logits = head(tower(pixels.to(device), grids).float())
        loss = nn.functional.cross_entropy(logits, labels.to(device), weight=weight)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            tower.eval()
            right, false = score(tower, head, held_out)
            tower.train()
            log(f"step {step}/{steps} | loss {loss.item():.4f} | held-out shapes named {right:.1%} | "
                f"tokens wrongly named a shape {false} | {time.time() - start:.0f} s")
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train a fresh vision tower for the demo on per-token shape labels.")
    parser.add_argument("base", help="checkpoint folder (or \"demo\") whose decoder and config are kept")
    parser.add_argument("out", type=Path, help="where the checkpoint with the new tower goes")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the next steps' pictures")
    args = parser.parse_args(argv)
    base = resolve_model_path(args.base)
    model = teach_tower(base, args.steps, args.seed, args.lr, args.batch_size, device=args.device,
                        workers=args.workers)
    save_full(model, base, args.out, torch.bfloat16)
    print(args.out)


if __name__ == "__main__":
    main()
