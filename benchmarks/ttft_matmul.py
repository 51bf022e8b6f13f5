"""Time to first token with and without `matmul="int8"`, interleaved in one process (2B shapes,
random weights, a fresh 448x448 image + question each request, 2 threads): the ratio of each pair
of requests taken back to back, so a shared machine's drift mostly cancels. `benchmarks/cpu_tier.py
--matmul int8` gives both against transformers (runs in turn, not interleaved).

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.ttft_matmul --reps 5
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.cpu_tier import load_ours
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
    (plain, load_plain), (int8, load_int8) = load_ours(folder, args.quantization), load_ours(folder, args.quantization,
                                                                                            "int8")
    print(f"tier {isa.current().tier}, {args.threads} threads, quantization {args.quantization}; load s: "
          f"default {load_plain:.2f}, matmul int8 {load_int8:.2f}")
    seeds = iter(range(5000, 100000))
    for llm in (plain, int8):  # warm-up: kernels built, caches touched
        engine_single(llm, next(seeds), 2)
    times = {"default": [], "matmul int8": []}
    for _ in range(args.reps):
        times["default"].append(engine_single(plain, next(seeds), 2)[0])
        times["matmul int8"].append(engine_single(int8, next(seeds), 2)[0])
    for name, ts in times.items():
        print(f"TTFT {name:12} median {statistics.median(ts):6.2f} s  [{', '.join(f'{t:.2f}' for t in ts)}]")
    ratios = [b / a for a, b in zip(times["default"], times["matmul int8"])]
    print(f"matmul int8 / default, pair by pair: median {statistics.median(ratios):.3f} "
          f"[{', '.join(f'{r:.3f}' for r in ratios)}]")


if __name__ == "__main__":
    main()
