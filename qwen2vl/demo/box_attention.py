"""`qwen2vl train` with one attention head taught to look at the shape a box question names.

    python -m qwen2vl.demo.box_attention --model demo --data ROWS.jsonl --output DIR [qwen2vl train's flags]
                                         [--layer 2] [--head 0] [--attention-weight 1.0]

At each box's "(" (the token that predicts x1's first digit), head HEAD of decoder layer LAYER must put its
attention on the named shape: the loss adds WEIGHT x -log(its attention on the picture tokens whose cell centre
lies in the box; the cell holding the box's centre if none does), averaged over the batch's boxes. The box is
the teacher-forced answer itself, so any rows of box questions (`python -m qwen2vl.demo.dataset DIR --where
2-3`) serve. Every 50 steps the log says the mean attention on the named shape.

Why (docs/demo.md, "The named shape"): every decoder trained so far answers one picture's box questions with
the box of one shape, most often the leftmost, whatever shape the question names; the LM loss alone never
taught a head to find the named shape (`box_report --every-shape`). Taught here, a head finds it within 100
steps; whether the box then follows depends on what the found token holds.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from qwen2vl.attention import packed_causal_attend
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.grounding import BOX_END, BOX_START, parse_grounding
from qwen2vl.hub import resolve_model_path
from qwen2vl.processing.processor import Processor
from qwen2vl.train.cli import add_train_arguments, config_from_args
from qwen2vl.train.loop import stderr_log, train
from qwen2vl.train.step import loss_sum

EVERY = 50  # steps between the log's attention lines


def named_cells(box: tuple[int, int, int, int], rows: int, cols: int) -> list[int]:
    """Raster indices of the merged tokens whose cell centre lies in `box` (0-1000 of width and height); the
    token holding the box's centre when no cell centre does (a small shape on a coarse grid)."""
    x1, y1, x2, y2 = box
    cells = [r * cols + c for r in range(rows) for c in range(cols)
             if x1 <= (c + 0.5) * 1000 / cols <= x2 and y1 <= (r + 0.5) * 1000 / rows <= y2]
    if cells:
        return cells
    return [min(rows - 1, int((y1 + y2) / 2000 * rows)) * cols + min(cols - 1, int((x1 + x2) / 2000 * cols))]


def box_queries(batch, tokenizer, image_token_id: int, merge: int = 2) -> list[tuple[int, int, list[int]]]:
    """(the "(" after each <|box_start|>, its sequence's first row, the named shape's rows) for the boxes of a
    packed batch's sequences that hold one picture."""
    ids, cu = batch.input_ids.tolist(), batch.cu_seqlens
    start_id, end_id = tokenizer.token_to_id(BOX_START), tokenizer.token_to_id(BOX_END)
    found, image = [], 0
    for a, b in zip(cu[:-1], cu[1:]):
        pads = [i for i in range(a, b) if ids[i] == image_token_id]
        pictures = sum(1 for i in pads if i == a or ids[i - 1] != image_token_id)  # a picture is a run of pads
        image += pictures
        if pictures != 1:
            continue
        _, h, w = batch.image_grid_thw[image - 1].tolist()
        for j in range(a, b - 1):
            if ids[j] != start_id or end_id not in ids[j:b]:
                continue
            box = parse_grounding(tokenizer.decode(ids[j:ids.index(end_id, j) + 1], skip_special_tokens=False))
            if box:
                found.append((j + 1, a, [pads[0] + c for c in named_cells(box[0].bbox, h // merge, w // merge)]))
    return found


def attention_on(q: torch.Tensor, k: torch.Tensor, query: int, start: int, targets: list[int], head: int):
    """-log of the attention that query row `query` of head `head` puts on rows `targets` (causal, within the
    sequence that begins at `start`); q [N, Hq, D], k [N, Hkv, D] as the decoder's attend gets them."""
    scores = k[start:query + 1, head // (q.shape[1] // k.shape[1])].float() @ q[query, head].float()
    logp = F.log_softmax(scores / q.shape[-1] ** 0.5, 0)
    return -torch.logsumexp(logp[torch.tensor(targets) - start], 0)


class AttentionLesson:
    """The training objective: the LM loss plus `weight` x the head's -log attention on the named shapes."""

    def __init__(self, tokenizer, image_token_id: int, layer: int, head: int, weight: float, log=stderr_log):
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.layer, self.head, self.weight, self.log = layer, head, weight, log
        self.calls, self.on_named = 0, []

    def __call__(self, model, batch) -> torch.Tensor:
        queries, losses = box_queries(batch, self.tokenizer, self.image_token_id), []
        causal = packed_causal_attend(batch.cu_seqlens)

        def attend(layer, q, k, v):
            if layer == self.layer:
                losses.extend(attention_on(q, k, *query, self.head) for query in queries)
            return causal(layer, q, k, v)

        lm = loss_sum(model, batch, attend)
        self.calls += 1
        if not losses:
            return lm
        off_named = torch.stack(losses)  # -log attention on the named shape, one per box
        self.on_named.append(float(torch.exp(-off_named.detach()).mean()))
        if self.calls % EVERY == 0:
            self.log(f"attention of layer {self.layer}, head {self.head} on the named shape: "
                     f"{sum(self.on_named) / len(self.on_named):.3f} (the last {len(self.on_named)} batches)")
            self.on_named = []
        return lm + self.weight * off_named.mean() * batch.num_targets  # train() divides by the targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="qwen2vl train, with a head taught to look at the named shape.")
    add_train_arguments(parser)
    parser.add_argument("--layer", type=int, default=2, help="the decoder layer whose head is taught (from 0)")
    parser.add_argument("--head", type=int, default=0, help="the query head taught (from 0)")
    parser.add_argument("--attention-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    folder = resolve_model_path(args.model)
    lesson = AttentionLesson(Processor.from_pretrained(folder).tokenizer,
                             Qwen2VLConfig.from_pretrained(folder).image_token_id, args.layer, args.head,
                             args.attention_weight)
    print(train(config_from_args(args), log=stderr_log, objective=lesson))
    return 0


if __name__ == "__main__":
    sys.exit(main())
