"""A lesson for the demo's vision tower alone: every merged token names what is drawn in it.

    python -m qwen2vl.demo.tower BASE OUT --steps 1800 [--seed 5] [--lr 1e-3] [--batch-size 16]
                                            [--device cuda] [--workers 8] [--mix picture=4,video=1.5,word=1.5]

trains a fresh vision tower (random weights) on the suite's pictures, videos and word pictures, with
linear heads on its merged tokens that must name, for each token, the shape whose square's centre falls
in it (one of the 18 colour/kind pairs) or nothing, that shape's direction in a video, and the
character in each quarter of its width (tower_cases.py), and writes BASE's checkpoint with that tower
in OUT (the decoder's weights as BASE has them; `qwen2vl train` then teaches the decoder to read it).
With `--place-weight W`, a fourth head must also say where each token holding a shape or a character is
(its cell's centre as fractions of the picture's width and height; mean squared error, times W).
With `--box-weight W`, a fifth head must say, from the token holding a still shape's centre, where that
shape's square lies (its edges in token units from the token's corner; mean squared error, times W);
with `--digit-weight W`, a sixth, from the same token, that square's hundreds and tens digits as the grounding
answer writes them (tower_heads.py). `--keep-tower` starts from BASE's tower instead of a fresh one, and
`--heads-first N` lets only the heads learn for N steps first. With `--anchor-weight W` (and `--keep-tower`),
every token that holds no character must stay what BASE's tower made of it (squared change over the old
tokens' squared norm, times W), so that a tower taught glyphs keeps the shape tokens BASE's decoder reads.

Why the anchor (docs/demo.md, "Every task on the reading decoder"): TS1, the shipped tower taught glyphs on
strips, still named every shape to a probe, yet beside the other tasks a new decoder learnt colours from it at a
quarter of the pace it learnt them from the shipped tower (16-22 of 100 after 600 steps against 62), and J2's
decoder could not read G2's moved tower (colours 67 of 100). Anchored at 10 (TK, "A tower taught glyphs that
keeps its shape tokens"), the shipped tower learnt to name 56% of characters in 1,200 steps of 64, J2's decoder
answered on it as on the shipped tower, and a new decoder learnt colours from it as fast.

Why the box (docs/demo.md, "Where the boxes are lost"): no decoder's box is finer than its hundreds digit.
The shipped tower's tokens hold where a shape's edges lie inside its token (a linear probe, the box head on the
frozen tower, boxes 87% of held-out shapes) and not where the token is (the place head's probe: R^2 < 0);
taught both (`--keep-tower --place-weight 20 --box-weight 20`), it says both (R^2 0.94, 99.5% boxed).

Why the place (docs/demo.md, "Where the tower puts things"): the tower has 2-D rotary and no absolute
position embedding, and the shipped one's shape tokens hold no place at all (a linear probe's R^2 < 0),
so boxes and a word's character order must come from the decoder's M-RoPE, whose width frequencies are
0.003 rad a token at most in the demo's shape. Asked, the tower learns it, through the background it sees
on each side (the shipped tower taught the place alone: R^2 0.97 for x and 0.98 for y after 250 steps of 16
on the CPU; a fresh one at weight 20: 0.97 after 350, but after 800 it named half the shapes a lesson
without the place names, and almost no motions: an experiment, not the recipe's default).

Why (docs/demo.md, 2026-12-04): the curriculum's tower (stages 1-9) sees colours but not kinds, and
cannot learn them: its patch embedding projects every patch onto its colour with a norm ~7x a fresh
tower's, and neither a lesson through the decoder (800 steps of 16) nor a classifier trained on the
tower directly took lone shapes' kinds much past half. A fresh tower with one label per token
learns colour and kind at once, in the place the decoder needs them: 89% of held-out shapes named
after 1,000 steps of 16, 95% after 1,800 (measured with a version that cached 6,000 pictures).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from qwen2vl.demo.dataset import parse_weights
from qwen2vl.demo.tower_cases import KINDS, Drawn
from qwen2vl.demo.tower_heads import Heads, iou, placed_tokens, still_centres, token_places
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.checkpoint import save_full
from qwen2vl.train.feed import in_order
from qwen2vl.train.setup import random_model

MIX = {"picture": 4.0, "video": 1.5, "word": 1.5}  # how often each kind of case (tower_cases.KINDS) is drawn


def draw(rng: random.Random, processor: Processor, mix: dict[str, float] = MIX) -> Drawn:
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    return KINDS[kind](rng, processor)


class Lesson(torch.utils.data.Dataset):
    """Item i: step i's cases, packed (a Drawn); drawn from (seed, i) alone, so worker processes can draw
    steps ahead."""

    def __init__(self, processor: Processor, steps: int, batch_size: int, seed: int, mix: dict[str, float] = MIX):
        self.processor, self.steps, self.batch_size, self.seed, self.mix = processor, steps, batch_size, seed, mix

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> Drawn:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} of {self.steps}")
        rng = random.Random(f"tower lesson {self.seed} {step}")
        return Drawn.cat([draw(rng, self.processor, self.mix) for _ in range(self.batch_size)])


def drift(tokens: torch.Tensor, anchor: torch.Tensor, case: Drawn) -> torch.Tensor:
    """The squared change of the tokens that hold no character, over their old squared norm."""
    kept = (case.chars == 0).all(-1).to(tokens.device)
    return ((tokens[kept] - anchor[kept]) ** 2).sum() / (anchor[kept] ** 2).sum().clamp(min=1e-9)


def score(tower: nn.Module, heads: Heads, cases: list[Drawn],
          anchored: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Share of labelled shapes, motions and characters named right; tokens wrongly named a shape; the place
    head's R^2 over x and y of the tokens it is taught on; the box head's share of still shapes boxed at IoU >=
    0.5 and its mean edge error in tokens; the digit head's share of hundreds and of tens digits right; with
    `anchored` (each case's tokens from BASE's tower), the mean drift of the tokens that hold no character."""
    right, held, false, moved = [0, 0, 0], [0, 0, 0], 0, 0.0
    device = heads.shapes.weight.device
    guessed, true, boxes, true_boxes, digits = [], [], [], [], [0, 0, 0]
    with torch.no_grad():
        for i, case in enumerate(cases):
            tokens = tower(case.pixels.to(device), case.grid)
            if anchored is not None:
                moved += float(drift(tokens, anchored[i], case)) / len(cases)
            mask = placed_tokens(case)
            guessed.append(heads.place(tokens.float()).cpu()[mask])
            true.append(token_places(case.grid)[mask])
            still = still_centres(case)
            boxes.append(heads.box(tokens.float()).cpu()[still])
            true_boxes.append(case.boxes[still])
            if heads.digit_weight and bool(still.any()):
                hit = heads.digit_logits(tokens).argmax(-1).cpu()[still] == case.digits[still]
                digits = [digits[0] + int(hit[:, 0::2].sum()), digits[1] + int(hit[:, 1::2].sum()),
                          digits[2] + hit[:, 0::2].numel()]
            guesses = [g.argmax(-1).cpu() for g in heads(tokens)]
            for i, (guess, labels) in enumerate(zip(guesses, (case.shapes, case.motion, case.chars))):
                mask = labels > 0
                right[i] += int((guess[mask] == labels[mask]).sum())
                held[i] += int(mask.sum())
            false += int((guesses[0][case.shapes == 0] > 0).sum())
    named = {k: r / max(h, 1) for k, r, h in zip(("shapes", "motions", "chars"), right, held)}
    guessed, true = torch.cat(guessed), torch.cat(true)
    place = 1 - float(((guessed - true) ** 2).sum() / ((true - true.mean(0)) ** 2).sum().clamp(min=1e-9))
    boxes, true_boxes = torch.cat(boxes), torch.cat(true_boxes)
    boxed = float((iou(boxes, true_boxes) >= 0.5).float().mean()) if len(boxes) else 0.0
    edge = float((boxes - true_boxes).abs().mean()) if len(boxes) else 0.0
    hundreds, tens = (d / max(digits[2], 1) for d in digits[:2])
    return {**named, "false shapes": false, "place R2": place, "boxed": boxed, "box error": edge,
            "hundreds": hundreds, "tens": tens, "drift": moved}


def teach_tower(base: Path, steps: int, seed: int = 5, lr: float = 1e-3, batch_size: int = 16,
                held_out: int = 100, device: str = "cpu", workers: int = 0, mix: dict[str, float] = MIX,
                log=None, place_weight: float = 0.0, box_weight: float = 0.0,
                keep_tower: bool = False, head_lr: float | None = None,
                digit_weight: float = 0.0, heads_first: int = 0, anchor_weight: float = 0.0) -> Qwen2VL:
    """BASE's model with a fresh vision tower (BASE's own with `keep_tower`) trained on token labels for
    `steps` AdamW steps (warmup, then cosine to a tenth); cases drawn by `workers` processes ahead of the
    steps (0: between steps). The heads learn at `head_lr` (default `lr`): a kept tower's heads start from
    nothing while the tower does not, and the place head's bias alone has to travel ~0.5. For the first
    `heads_first` steps the tower's rate is 0 and only the heads learn: fresh heads' first gradients through a
    kept tower unteach it (T8's and T9's held-out shapes named fell from ~95% to 1-18% in 50 steps).
    `anchor_weight` (a kept tower only) holds the tokens without characters where BASE's tower put them."""
    if anchor_weight and not keep_tower:
        raise ValueError("--anchor-weight holds a kept tower's tokens: it needs --keep-tower")
    log = log or (lambda text: print(text, flush=True))
    torch.manual_seed(seed)
    processor = Processor.from_pretrained(base)
    model = Qwen2VL.from_pretrained(base, dtype=torch.float32, device=device)
    if not keep_tower:
        model.visual = random_model(base, device).visual
    anchor = copy.deepcopy(model.visual).float().eval() if anchor_weight else None  # frozen, as loaded
    tower = model.visual.float().train().requires_grad_(True)  # a loaded model's weights come frozen
    heads = Heads(model.config.vision.hidden_size, device, place_weight, box_weight, digit_weight)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW([{"params": list(tower.parameters())},
                                   {"params": list(heads.parameters()), "lr": lr if head_lr is None else head_lr}],
                                  lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = min(30, steps)

    def rate(start: int):
        cosine = lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
        return lambda s: (s >= start) * min(1.0, (s - start + 1) / warmup) * cosine(s)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [rate(heads_first), rate(0)])
    held_out = [draw(random.Random(f"held-out {seed} {i}"), processor, mix) for i in range(held_out)]
    anchored = None  # the held-out cases' tokens from the frozen BASE tower: the same at every score
    if anchor is not None:
        with torch.no_grad():
            anchored = [anchor(case.pixels.to(device), case.grid) for case in held_out]
    lesson = in_order(Lesson(processor, steps, batch_size, seed, mix), workers, seed)
    start, every = time.time(), max(50, steps // 15)  # the held-out score costs ~a step per case
    for step, case in enumerate(lesson, 1):
        tokens = tower(case.pixels.to(device), case.grid)
        loss = heads.loss(tokens, case)
        if anchor is not None:
            with torch.no_grad():
                old = anchor(case.pixels.to(device), case.grid)
            loss = loss + anchor_weight * drift(tokens, old, case)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % every == 0 or step == steps:
            tower.eval()
            named = score(tower, heads, held_out, anchored)
            tower.train()
            place = f" | place R^2 {named['place R2']:.2f}" if place_weight else ""
            if box_weight:
                place += f" | boxed {named['boxed']:.1%}, edges off {named['box error']:.2f} of a token"
            if digit_weight:
                place += f" | box digits right: hundreds {named['hundreds']:.1%}, tens {named['tens']:.1%}"
            if anchor is not None:
                place += f" | drift {named['drift']:.4f}"
            log(f"step {step}/{steps} | loss {loss.item():.4f} | held-out shapes named {named['shapes']:.1%}, "
                f"motions {named['motions']:.1%}, characters {named['chars']:.1%} | tokens wrongly named a "
                f"shape {named['false shapes']}{place} | {time.time() - start:.0f} s")
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Train a fresh vision tower for the demo on per-token shape labels.")
    parser.add_argument("base", help="checkpoint folder (or \"demo\") whose decoder and config are kept")
    parser.add_argument("out", type=Path, help="where the checkpoint with the new tower goes")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, help="the heads' learning rate (default --lr)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--place-weight", type=float, default=0.0, help="weight of the place head's "
                        "loss (where each token holding a shape or a character is; default 0: left out)")
    parser.add_argument("--box-weight", type=float, default=0.0, help="weight of the box head's loss "
                        "(where a still shape's edges lie, from its centre's token; default 0: left out)")
    parser.add_argument("--digit-weight", type=float, default=0.0, help="weight of the digit head's "
                        "loss (a still shape's box as the answer writes it, hundreds and tens; default 0)")
    parser.add_argument("--heads-first", type=int, default=0, help="steps at the start in which only the heads "
                        "learn (the tower's rate 0; for --keep-tower)")
    parser.add_argument("--keep-tower", action="store_true", help="start from BASE's tower, not a fresh one")
    parser.add_argument("--anchor-weight", type=float, default=0.0, help="weight of the squared change of the "
                        "tokens without characters from BASE's tower's (for --keep-tower; default 0: left out)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the next steps' cases")
    parser.add_argument("--mix", type=lambda text: parse_weights(text, KINDS, "kind"), default=MIX,
                        metavar="KIND=W,...",
                        help="how often each kind of case is drawn (default picture=4,video=1.5,word=1.5)")
    args = parser.parse_args(argv)
    base = resolve_model_path(args.base)
    model = teach_tower(base, args.steps, args.seed, args.lr, args.batch_size, device=args.device,
                        workers=args.workers, mix=args.mix, place_weight=args.place_weight,
                        box_weight=args.box_weight, keep_tower=args.keep_tower, head_lr=args.head_lr,
                        digit_weight=args.digit_weight, heads_first=args.heads_first,
                        anchor_weight=args.anchor_weight)
    save_full(model, base, args.out, torch.bfloat16)
    print(args.out)


if __name__ == "__main__":
    main()
