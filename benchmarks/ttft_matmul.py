"""Time to first token with and without `matmul="int8"`, in turn in one process (2B shapes, random
weights, a fresh 448x448 image + question each request, 2 threads): rounds of one request each,
and the ratio of each round's pair, so a shared machine's drift mostly cancels. `benchmarks/cpu_tier.py
--matmul int8` gives both against transformers (runs in turn, not interleaved).

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.ttft_matmul --reps 5
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from benchmarks.cpu_tier import load_ours, median
from benchmarks.engine_cpu import engine_single
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl.backends.cpu import isa


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", choices=["int8"], help="both models quantized so (their prefill's kernel)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    print(f"tier {isa.current().tier}, {args.threads} threads, quantization {args.quantization}")
    seeds = iter(range(5000, 100000))
    times, loads = {"default": [], "matmul int8": []}, {"default": [], "matmul int8": []}
    # one model in memory at a time (a 2B in bf16 plus one with int8 codes beside it is ~10 GB): each
    # round loads each in turn, warms it up, takes one request
    for _ in range(args.reps):
        for name, matmul in (("default", None), ("matmul int8", "int8")):
            llm, seconds = load_ours(folder, args.quantization, matmul)
            loads[name].append(seconds)
            engine_single(llm, next(seeds), 2)  # warm-up: kernels built, caches touched
            times[name].append(engine_single(llm, next(seeds), 2)[0])
            del llm
            gc.collect()
    for name, ts in loads.items():
        print(f"load {name:12} median {median(ts)} s")
    for name, ts in times.items():
        print(f"TTFT {name:12} median {median(ts)} s")
    ratios = [b / a for a, b in zip(times["default"], times["matmul int8"])]
    print(f"matmul int8 / default, pair by pair: median {statistics.median(ratios):.3f} "
          f"[{', '.join(f'{r:.3f}' for r in ratios)}]")


if __name__ == "__main__":
    main()
