"""The tower lesson's heads (tower.py): linear readers on the merged tokens, and what each is taught.

Each head says one thing a token must hold for the decoder to read it: the shape whose centre is in it, that
shape's motion, the characters in its quarters; and, when weighted, where the token is (place), where a
still shape's square lies from its centre's token (box), and that square's hundreds and tens digits as the
grounding answer writes them (digits). Why each: tower.py's docstring and docs/demo.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen2vl.demo import tower_cases
from qwen2vl.demo.tower_cases import CHAR_CLASSES, MOTION_CLASSES, SHAPE_CLASSES, SLOTS, Drawn

NOTHING_WEIGHT = 0.2  # most tokens hold no shape's centre; at full weight "nothing" everywhere is a cheap minimum


class Heads(nn.Module):
    """Linear heads on the merged tokens: the shape, its motion, the character in each quarter; and the place
    of the tokens that hold a shape or a character, weighted by `place_weight`, and the box of each still
    shape from its centre's token, weighted by `box_weight`, and that box's digits as the answer writes them,
    weighted by `digit_weight` (0, the shipped tower's lesson: not trained)."""

    def __init__(self, width: int, device, place_weight: float = 0.0, box_weight: float = 0.0,
                 digit_weight: float = 0.0):
        super().__init__()
        self.shapes = nn.Linear(width, SHAPE_CLASSES, device=device)
        self.motion = nn.Linear(width, MOTION_CLASSES, device=device)
        self.chars = nn.Linear(width, SLOTS * CHAR_CLASSES, device=device)
        self.place = nn.Linear(width, 2, device=device)
        self.box = nn.Linear(width, 4, device=device)
        self.place_weight, self.box_weight = place_weight, box_weight
        if digit_weight:  # made only when taught, so that the other heads' first weights are drawn as before
            self.digits = nn.Linear(width, tower_cases.DIGITS * tower_cases.DIGIT_CLASSES, device=device)
        self.digit_weight = digit_weight

    def digit_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[tokens, DIGITS, DIGIT_CLASSES], read from the tokens as the decoder's first RMSNorm scales them: the
        digits must be a large part of the token, not a faint direction a linear probe can still find (T8's place,
        R^2 0.94 to a probe, went unread by every decoder)."""
        tokens = tokens.float()
        tokens = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.digits(tokens).unflatten(-1, (tower_cases.DIGITS, tower_cases.DIGIT_CLASSES))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = tokens.float()
        return self.shapes(tokens), self.motion(tokens), self.chars(tokens).unflatten(-1, (SLOTS, CHAR_CLASSES))

    def loss(self, tokens: torch.Tensor, case: Drawn) -> torch.Tensor:
        device = tokens.device
        named = sum(nn.functional.cross_entropy(logits.flatten(0, -2), labels.to(device).flatten(),
                                                weight=_weights(logits.shape[-1], device))
                    for logits, labels in zip(self(tokens), (case.shapes, case.motion, case.chars)))
        if self.place_weight:
            held = placed_tokens(case).to(device)
            error = self.place(tokens.float()[held]) - token_places(case.grid).to(device)[held]
            named = named + self.place_weight * (error ** 2).sum() / max(2 * int(held.sum()), 1)  # none: 0
        if self.box_weight:
            boxed = still_centres(case).to(device)
            error = self.box(tokens.float()[boxed]) - case.boxes.to(device)[boxed]
            named = named + self.box_weight * (error ** 2).sum() / max(4 * int(boxed.sum()), 1)
        if self.digit_weight and bool((case.digits != tower_cases.IGNORE).any()):
            logits, labels = self.digit_logits(tokens).flatten(0, 1), case.digits.to(device).flatten()
            named = named + self.digit_weight * nn.functional.cross_entropy(logits, labels,
                                                                            ignore_index=tower_cases.IGNORE)
        return named


def token_places(grid: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """[tokens, 2]: each merged token's cell centre as fractions of its picture's width and height, for the
    cases of `grid` (t, h, w in patches) one after another, frame pair by frame pair, in raster order."""
    places = []
    for t, h, w in grid.tolist():
        rows, cols = h // merge, w // merge
        y = (torch.arange(rows) + 0.5) / rows
        x = (torch.arange(cols) + 0.5) / cols
        cell = torch.stack([x.repeat(rows), y.repeat_interleave(cols)], dim=1)  # raster order
        places.append(cell.repeat(t, 1))
    return torch.cat(places)


def placed_tokens(case: Drawn) -> torch.Tensor:
    """The tokens whose place is taught: a shape's centre or a character is in them (a plain background's
    tokens are all alike, and cannot know where they are)."""
    return (case.shapes > 0) | (case.chars > 0).any(dim=1)


def still_centres(case: Drawn) -> torch.Tensor:
    return ~case.boxes[:, 0].isnan()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] intersection over union of boxes [n, 4] (left, top, right, bottom) in the same units."""
    wide = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    high = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    both = wide * high
    return both / (_area(a) + _area(b) - both).clamp(min=1e-9)


def _area(box: torch.Tensor) -> torch.Tensor:
    return (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)


def _weights(classes: int, device) -> torch.Tensor:
    weight = torch.ones(classes, device=device)
    weight[0] = NOTHING_WEIGHT
    return weight
