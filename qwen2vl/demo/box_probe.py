"""Where a decoder loses the box: what its layers hold at each box's "(" on held-out rows.

    python -m qwen2vl.demo.box_probe MODEL ROWS.jsonl [--layer 2] [--head 0]

teacher-forces ROWS (box questions: `python -m qwen2vl.demo.dataset DIR --where 2-3 --cases 700 --seed S` with a
seed no training set used) through MODEL and prints, at each box's "(" (the token that predicts x1's first digit):
the attention head HEAD of layer LAYER puts on the named shape (what `box_attention` teaches, on rows it never
saw), the box that head's first four value dimensions say as `box_attention --value-weight` reads them, and then
how much of the box a linear probe (ridge, fit on the first three quarters of the boxes, scored on the rest) finds
in the picture's tokens of the named shape (the ceiling: what the tower gives), in each layer's attention output,
in the residual stream after each layer, and in the named shape's tokens after each layer (what the decoder's own
positions, M-RoPE, add to them: a head can only carry to "(" what the tokens it lands on hold). Each line: the
share of boxes with IoU >= 0.5 and the median error (0-1000).

Why (docs/demo.md, "A head taught to carry the box"): the training log averages the head's attention over every
token it is taught at (0.9 with `--every-position`, where it was 0.5 at the `(` that matters), and the suite's
answers alone cannot tell a decoder that does not find the shape from one that finds it and loses the box on the
way to the digits.
"""

from __future__ import annotations

import argparse

import torch

from qwen2vl.attention import packed_causal_attend
from qwen2vl.demo.box_attention import attention_logs, box_queries, unit_to_box, value_read
from qwen2vl.demo.tower_heads import iou
from qwen2vl.model import Qwen2VL
from qwen2vl.processing.processor import Processor
from qwen2vl.train.batch import pack
from qwen2vl.train.data import read_rows
from qwen2vl.train.examples import encode_row

ROWS_A_BATCH = 8
RIDGE = 0.1


def gather(model: Qwen2VL, processor: Processor, rows: list, layer: int, head: int) -> tuple[dict, torch.Tensor]:
    """({name: [boxes, ...] features at each box's "("}, [boxes, 4] the true boxes, 0-1000)."""
    config = model.config
    found: dict[str, list] = {}
    boxes, caught, hooks = [], {}, []
    for i, block in enumerate(model.model.layers):  # the residual stream after a layer is its two outputs' sum
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: caught.__setitem__(f"after layer {i}", out[0] + out[1])))
        hooks.append(block.self_attn.register_forward_hook(
            lambda m, a, out, i=i: caught.__setitem__(f"attention {i}", out)))
    with torch.no_grad():
        for first in range(0, len(rows), ROWS_A_BATCH):
            batch = pack([encode_row(r, processor, config) for r in rows[first:first + ROWS_A_BATCH]])
            ids = batch.input_ids.to(model.device)
            x = model.embed(ids, model.encode_vision(ids, batch.pixel_values, batch.image_grid_thw, None, None))
            taught = {}
            model.model(x, batch.positions.to(model.device), _watching(packed_causal_attend(batch.cu_seqlens),
                                                                       layer, taught))
            q, k, v = taught["qkv"]
            for query in box_queries(batch, processor.tokenizer, config.image_token_id):
                logs = attention_logs(q, k, [query.row], query.start)[head]  # [1, keys]
                named = torch.tensor(query.named, device=logs.device) - query.start
                found.setdefault("on the named shape", []).append(logs[0, named].exp().sum().reshape(1))
                found.setdefault("value box", []).append(unit_to_box(value_read(logs, v, query.start, head,
                                                                                q.shape[1]))[0])
                found.setdefault("the named shape's tokens", []).append(x[query.named].mean(0))
                for name, hidden in caught.items():
                    found.setdefault(name, []).append(hidden[query.row])
                    if name.startswith("after layer"):  # what the decoder has written into the shape's own tokens
                        found.setdefault(f"the named shape {name}", []).append(hidden[query.named].mean(0))
                boxes.append(torch.tensor(query.box, dtype=torch.float))
    for hook in hooks:
        hook.remove()
    return {name: torch.stack(f).float().cpu() for name, f in found.items()}, torch.stack(boxes)


def _watching(attend, layer: int, taught: dict):
    """`attend`, keeping layer `layer`'s q, k and v in `taught`."""
    def watch(i, q, k, v):
        if i == layer:
            taught["qkv"] = (q, k, v)
        return attend(i, q, k, v)
    return watch


def probe(features: torch.Tensor, boxes: torch.Tensor, fit: int) -> torch.Tensor:
    """The boxes a ridge probe fit on the first `fit` rows says for the rest."""
    a = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    w = torch.linalg.solve(a[:fit].T @ a[:fit] + RIDGE * torch.eye(a.shape[1], dtype=a.dtype),
                           a[:fit].T @ boxes[:fit].double())
    return (a[fit:] @ w).float()


def box_line(name: str, said: torch.Tensor, boxes: torch.Tensor) -> str:
    error = (said - boxes).abs().flatten().sort().values
    return f"  {name:30s} IoU >= 0.5 {float((iou(said, boxes) >= 0.5).float().mean()):6.1%}, " \
           f"error median {float(error[len(error) // 2]):5.1f}"


def report(features: dict, boxes: torch.Tensor, layer: int, head: int) -> list[str]:
    fit = len(boxes) * 3 // 4
    on_named = float(features.pop("on the named shape").mean())
    lines = [f"{len(boxes)} boxes; probes fit on {fit}, scored on {len(boxes) - fit}",
             f"  layer {layer}, head {head}: attention on the named shape {on_named:.3f}",
             box_line(f"its value's box (layer {layer})", features.pop("value box"), boxes)]
    return lines + [box_line(name, probe(f, boxes, fit), boxes[fit:]) for name, f in features.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Where a decoder loses the box, layer by layer.")
    parser.add_argument("model")
    parser.add_argument("rows", help="a JSONL of box questions the model was not trained on")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--head", type=int, default=0)
    args = parser.parse_args(argv)
    model = Qwen2VL.from_pretrained(args.model, dtype=torch.float32)
    processor = Processor.from_pretrained(args.model)
    features, boxes = gather(model, processor, read_rows(args.rows), args.layer, args.head)
    print(f"{args.model}:", *report(features, boxes, args.layer, args.head), sep="\n")


if __name__ == "__main__":
    main()
