"""`qwen2vl train` with one attention head taught to look at the shape a box question names.

    python -m qwen2vl.demo.box_attention --model demo --data ROWS.jsonl --output DIR [qwen2vl train's flags]
                                         [--layer 2] [--head 0] [--attention-weight 1.0]
                                         [--every-position] [--value-weight 0] [--route-weight 0]

At each box's "(" (the token that predicts x1's first digit; with `--every-position`, at every token of the box's
numbers up to the last digit), head HEAD of decoder layer LAYER must put its attention on the named shape: the
loss adds WEIGHT x -log(its attention on the picture tokens whose cell centre lies in the box; the cell holding
the box's centre if none does), averaged over the batch's queries. With `--value-weight`, what the head reads
there must also say the box: the first four dimensions of its attention-weighted values must be the box's
x1, y1, x2, y2 scaled to [-1, 1] (mean squared error, times the weight). With `--route-weight`, every other head
of every layer must look away from the picture at those tokens (-log(1 - its attention on the picture's tokens),
averaged, times the weight), so that the taught head is the box's only way in. The box is the teacher-forced
answer itself, so any rows of box questions (`python -m qwen2vl.demo.dataset DIR --where 2-3`) serve. Every 50
steps the log says the mean attention on the named shape (and the value's error and the other heads' attention
on the picture when taught).

Why (docs/demo.md, "The named shape"): every decoder trained so far answers one picture's box questions with
the box of one shape, most often the leftmost, whatever shape the question names; the LM loss alone never
taught a head to find the named shape (`box_report --every-shape`). Taught here, a head finds it within 100
steps; whether the box then follows depends on what the head reads there and on which heads the digits use.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from qwen2vl.attention import packed_causal_attend
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.grounding import BOX_END, BOX_START, parse_grounding
from qwen2vl.hub import resolve_model_path
from qwen2vl.processing.processor import Processor
from qwen2vl.train.cli import add_train_arguments, config_from_args
from qwen2vl.train.loop import stderr_log, train
from qwen2vl.train.step import loss_sum

EVERY = 50  # steps between the log's attention lines
BOX_DIMS = 4  # the value dimensions that must say the box: x1, y1, x2, y2


@dataclass
class BoxQuery:
    """A row of a packed batch that predicts a box's digit, with what the lessons need there."""
    row: int
    start: int  # the first row of its sequence
    named: list[int]  # the rows of the named shape's tokens
    box: tuple[int, int, int, int]  # the teacher-forced box, 0-1000 of width and height
    picture: list[int]  # every row of the picture


def named_cells(box: tuple[int, int, int, int], rows: int, cols: int) -> list[int]:
    """Raster indices of the merged tokens whose cell centre lies in `box` (0-1000 of width and height); the
    token holding the box's centre when no cell centre does (a small shape on a coarse grid)."""
    x1, y1, x2, y2 = box
    cells = [r * cols + c for r in range(rows) for c in range(cols)
             if x1 <= (c + 0.5) * 1000 / cols <= x2 and y1 <= (r + 0.5) * 1000 / rows <= y2]
    if cells:
        return cells
    return [min(rows - 1, int((y1 + y2) / 2000 * rows)) * cols + min(cols - 1, int((x1 + x2) / 2000 * cols))]


def box_queries(batch, tokenizer, image_token_id: int, merge: int = 2,
                every_position: bool = False) -> list[BoxQuery]:
    """The "(" after each <|box_start|> (with `every_position`, each token from it to the last digit) of the
    boxes of a packed batch's sequences that hold one picture."""
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
            end = ids.index(end_id, j)
            box = parse_grounding(tokenizer.decode(ids[j:end + 1], skip_special_tokens=False))
            if box:
                named = [pads[0] + c for c in named_cells(box[0].bbox, h // merge, w // merge)]
                found.extend(BoxQuery(row, a, named, box[0].bbox, pads)
                             for row in (range(j + 1, end) if every_position else (j + 1,)))
    return found


def attention_logs(q: torch.Tensor, k: torch.Tensor, rows: list[int], start: int) -> torch.Tensor:
    """[query heads, len(rows), keys]: the log of the causal attention of query rows `rows` of the sequence that
    begins at `start` on its keys start..max(rows), as the decoder computes it (-inf after each query); q [N, Hq,
    D], k [N, Hkv, D]. Logs, because a head can put all but 1e-5 of its attention on the picture, and
    -log(1 - that) from the weights would round."""
    keys = k[start:max(rows) + 1].float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q[rows].float(), keys) / q.shape[-1] ** 0.5
    later = torch.arange(start, max(rows) + 1, device=q.device)[None, :] > torch.tensor(rows, device=q.device)[:, None]
    return scores.masked_fill(later, float("-inf")).log_softmax(-1)


def value_read(logs: torch.Tensor, v: torch.Tensor, start: int, head: int, q_heads: int) -> torch.Tensor:
    """[n, BOX_DIMS]: the first BOX_DIMS dimensions of what query head `head` reads with attention `logs` [n, keys]
    (attention_logs' rows for that head) from values v [N, Hkv, D], on the value lesson's [-1, 1] scale."""
    kv = head // (q_heads // v.shape[1])
    return logs.exp() @ v[start:start + logs.shape[-1], kv, :BOX_DIMS].float()


def box_to_unit(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes on the answer's 0-1000 scale -> the value lesson's [-1, 1]."""
    return boxes / 500 - 1


def unit_to_box(read: torch.Tensor) -> torch.Tensor:
    return (read + 1) * 500


def _within(logs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """-log of the attention on the keys where `rows` is True."""
    return -torch.logsumexp(logs.masked_fill(~rows.to(logs.device), float("-inf")), dim=-1)


def _on(queries: list[BoxQuery], field: str, start: int, keys: int) -> torch.Tensor:
    """[len(queries), keys] True on each query's `field` rows."""
    mask = torch.zeros(len(queries), keys, dtype=torch.bool)
    for i, query in enumerate(queries):
        mask[i, torch.tensor(getattr(query, field)) - start] = True
    return mask


@dataclass
class _Sequence:
    """One packed sequence's box queries, with the masks and boxes every layer's lessons use (made once a batch)."""
    start: int
    rows: list[int]
    named: torch.Tensor  # [n, keys] the named shape's rows
    picture: torch.Tensor  # [n, keys] the picture's rows
    boxes: torch.Tensor  # [n, BOX_DIMS] on the value lesson's [-1, 1]

    @staticmethod
    def of(group: list[BoxQuery]) -> _Sequence:
        start, rows = group[0].start, [query.row for query in group]
        keys = max(rows) + 1 - start
        return _Sequence(start, rows, _on(group, "named", start, keys), _on(group, "picture", start, keys),
                         box_to_unit(torch.tensor([query.box for query in group], dtype=torch.float)))


class AttentionLesson:
    """The training objective: the LM loss plus `weight` x the head's -log attention on the named shapes, and,
    when weighted, the error of the box its values say (`value_weight`) and the other heads' look at the
    picture (`route_weight`)."""

    def __init__(self, tokenizer, image_token_id: int, layer: int, head: int, weight: float, log=stderr_log,
                 value_weight: float = 0.0, route_weight: float = 0.0, every_position: bool = False):
        self.tokenizer, self.image_token_id = tokenizer, image_token_id
        self.layer, self.head, self.weight, self.log = layer, head, weight, log
        self.value_weight, self.route_weight, self.every_position = value_weight, route_weight, every_position
        self.calls, self.seen = 0, {"on the named shape": [], "value's box error": [], "others on the picture": []}

    def _score(self, layer: int, q, k, v, seq: _Sequence, named: list, values: list, routes: list) -> None:
        """One sequence's queries at one layer: -log attention on the named shape and the value's box error
        (the taught layer), and the other heads' -log(1 - attention on the picture)."""
        logs = attention_logs(q, k, seq.rows, seq.start)  # [Hq, n, keys]
        others = torch.ones(logs.shape[0], dtype=torch.bool)
        if layer == self.layer:
            named.append(_within(logs[self.head], seq.named))
            if self.value_weight:
                read = value_read(logs[self.head], v, seq.start, self.head, q.shape[1])
                values.append(((read - seq.boxes.to(read.device)) ** 2).mean(-1))
            others[self.head] = False
        if self.route_weight:
            routes.append(_within(logs[others], ~seq.picture).flatten())

    def __call__(self, model, batch) -> torch.Tensor:
        queries = box_queries(batch, self.tokenizer, self.image_token_id, every_position=self.every_position)
        groups: dict[int, list[BoxQuery]] = {}
        for query in queries:
            groups.setdefault(query.start, []).append(query)
        sequences = [_Sequence.of(group) for group in groups.values()]
        named, values, routes = [], [], []
        causal = packed_causal_attend(batch.cu_seqlens)

        def attend(layer, q, k, v):
            if layer == self.layer or self.route_weight:
                for seq in sequences:
                    self._score(layer, q, k, v, seq, named, values, routes)
            return causal(layer, q, k, v)

        lm = loss_sum(model, batch, attend)
        self.calls += 1
        if not named:
            return lm
        off_named = torch.cat(named)  # -log attention on the named shape, one per query
        extra = self.weight * off_named.mean()
        self.seen["on the named shape"].append(float(torch.exp(-off_named.detach()).mean()))
        if values:
            error = torch.cat(values).mean()
            extra = extra + self.value_weight * error
            self.seen["value's box error"].append(float(error.detach()))
        if routes:
            look = torch.cat(routes).mean()
            extra = extra + self.route_weight * look
            self.seen["others on the picture"].append(float(1 - torch.exp(-look.detach())))  # 1 - geometric mean of
            # their attention off the picture: one head staring at it shows where a plain mean would hide it
        if self.calls % EVERY == 0:
            said = {name: sum(v) / len(v) for name, v in self.seen.items() if v}
            self.log(f"layer {self.layer}, head {self.head}: " + ", ".join(f"{name} {value:.3f}"
                                                                          for name, value in said.items())
                     + f" (the last {len(self.seen['on the named shape'])} batches)")
            self.seen = {name: [] for name in self.seen}
        return lm + extra * batch.num_targets  # train() divides by the targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="qwen2vl train, with a head taught to look at the named shape.")
    add_train_arguments(parser)
    parser.add_argument("--layer", type=int, default=2, help="the decoder layer whose head is taught (from 0)")
    parser.add_argument("--head", type=int, default=0, help="the query head taught (from 0)")
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--every-position", action="store_true",
                        help="teach the head at every token of the box's numbers, not at its '(' alone")
    parser.add_argument("--value-weight", type=float, default=0.0,
                        help="the head's first four value dimensions must say the box (mean squared error x this)")
    parser.add_argument("--route-weight", type=float, default=0.0,
                        help="every other head must look away from the picture at the taught tokens")
    args = parser.parse_args(argv)
    folder = resolve_model_path(args.model)
    lesson = AttentionLesson(Processor.from_pretrained(folder).tokenizer,
                             Qwen2VLConfig.from_pretrained(folder).image_token_id, args.layer, args.head,
                             args.attention_weight, value_weight=args.value_weight, route_weight=args.route_weight,
                             every_position=args.every_position)
    print(train(config_from_args(args), log=stderr_log, objective=lesson))
    return 0


if __name__ == "__main__":
    sys.exit(main())
