"""A training step's time with the packed attention in one masked call vs one call per row / block length.

    python -m benchmarks.train_step_attention MODEL DATA.jsonl [--device cuda] [--batch-size 32] [--steps 10]

On a GPU (attention._one_masked_call) every packed row of a training batch, and every block length of its
pictures in the vision tower, goes through one SDPA call under an N x N mask instead of one call each.
This runs the same batches both ways in one process (the whole model trained, bf16 autocast) and prints
the mean step time of each, their ratio, and the loss and gradient norm of the first batch both ways (the
masked call must give the same numbers within bf16 rounding). On a CPU both ways are the CPU's own path
(the switch is GPU-only), so the ratio is ~1 there: it is a GPU benchmark.
"""

from __future__ import annotations

import argparse
import time

import torch

import qwen2vl.attention as attention
from qwen2vl.hub import resolve_model_path
from qwen2vl.processing.processor import Processor
from qwen2vl.train.data import read_rows
from qwen2vl.train.feed import Encoder
from qwen2vl.train.setup import load_for_training, trainable_parameters
from qwen2vl.train.step import loss_sum


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    folder = resolve_model_path(args.model)
    processor = Processor.from_pretrained(folder)
    rows = read_rows(args.data)[: args.batch_size * args.steps]
    model = load_for_training(folder, dtype=torch.bfloat16, device=args.device, full=True, train_vision=True)
    encoder = Encoder(processor, model.config, model.config.text.max_position_embeddings, print)
    n = args.batch_size
    batches = encoder.batches([list(range(i, min(i + n, len(rows)))) for i in range(0, len(rows), n)], rows)
    params = list(trainable_parameters(model).values())
    real = attention._one_masked_call

    def step(batch) -> tuple[float, float]:
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = loss_sum(model, batch) / batch.num_targets
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        for p in params:
            p.grad = None
        return loss.item(), float(norm)

    def timed(way: str) -> float:
        attention._one_masked_call = real if way == "masked" else (lambda q: False)
        step(batches[0])  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        for b in batches:
            step(b)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - began) / len(batches)

    try:
        first = {}
        for way in ("per call", "masked"):
            attention._one_masked_call = real if way == "masked" else (lambda q: False)
            first[way] = step(batches[0])
        times = {way: timed(way) for way in ("per call", "masked", "per call", "masked")}  # the later run of each
    finally:
        attention._one_masked_call = real
    tokens = sum(b.num_tokens for b in batches) / len(batches)
    print(f"{len(batches)} batches of {n} rows (~{tokens:.0f} tokens) on {args.device}")
    for way in ("per call", "masked"):
        loss, norm = first[way]
        print(f"{way:>9}: {times[way] * 1e3:.1f} ms a step | first batch loss {loss:.5f}, grad norm {norm:.4f}")
    print(f"masked / per call: {times['masked'] / times['per call']:.2f}x the time")


if __name__ == "__main__":
    main()
