"""What advising the packed decoder weights onto huge pages costs at load (and gives at decode).

    python -m benchmarks.load_pages --reps 3 [--model DIR] [--decode]

Loads the 2B-shaped checkpoint with `LLM(dtype="bfloat16")` alternately as shipped (gemm.empty_huge:
fresh mappings advised MADV_HUGEPAGE) and with plain torch.empty memory, `--reps` times each, and
prints the load times; with `--decode`, both models stay loaded and one 48-token stream alternates
between them, with the read probe around each run. On a VM the first touch of a huge page can cost
a host fault per 2 MiB (free memory handed back to the host), which is what the load pays.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.bandwidth import memory_gbs
from benchmarks.engine_cpu import engine_single
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import gemm

PAGES = {"huge pages": gemm.empty_huge, "plain pages": lambda shape, dtype: torch.empty(shape, dtype=dtype)}


def load(folder: str, pages: str) -> tuple[LLM, float]:
    gemm.empty_huge = PAGES[pages]
    try:
        start = time.perf_counter()
        llm = LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=0.5)
        return llm, time.perf_counter() - start
    finally:
        gemm.empty_huge = PAGES["huge pages"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the cached random 2B, built if missing)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    folder = args.model or str(random_checkpoint("2b"))
    times = {name: [] for name in PAGES}
    for rep in range(args.reps):
        for name in PAGES if rep % 2 == 0 else reversed(PAGES):
            llm, seconds = load(folder, name)
            times[name].append(seconds)
            del llm
            gc.collect()
    for name, xs in times.items():
        print(f"load, {name:<12} {statistics.median(xs):6.2f} s  [{', '.join(f'{x:.2f}' for x in xs)}]")
    if not args.decode:
        return
    llms = {name: load(folder, name)[0] for name in PAGES}
    rates = {name: [] for name in PAGES}
    for rep in range(args.reps):
        for name in PAGES if rep % 2 == 0 else reversed(PAGES):
            before = memory_gbs(3)[1]
            rates[name].append(engine_single(llms[name], rep + 1, 48)[1])
            after = memory_gbs(3)[1]
            print(f"decode, {name:<12} {rates[name][-1]:6.2f} tok/s  read probe {before:.1f} / {after:.1f} GB/s")
    for name, xs in rates.items():
        print(f"decode, {name:<12} median {statistics.median(xs):6.2f} tok/s")


if __name__ == "__main__":
    main()
