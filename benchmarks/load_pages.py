"""What the load's memory choices cost at load (and give at decode): huge pages for the packed
decoder weights, and mapping the linears' weights from the file rather than reading them.

    python -m benchmarks.load_pages --reps 3 [--model DIR] [--decode]

Loads the 2B-shaped checkpoint with `LLM(dtype="bfloat16")` alternately as shipped (linears mapped
from the file, gemm.empty_huge: fresh mappings advised MADV_HUGEPAGE), with plain torch.empty
memory for the packed weights, and with the linears read into fresh memory (loader.py before the
maps), `--reps` times each, and prints the load times; with `--decode`, the first two stay loaded
and one 48-token stream alternates between them, with the read probe around each run. On a VM the
first touch of fresh memory can cost a host fault (free memory handed back to the host), which is
what the load pays.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.bandwidth import memory_gbs
from benchmarks.cpu_tier import median
from benchmarks.engine_cpu import engine_single
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import gemm
from qwen2vl.model import Qwen2VL

HUGE = gemm.empty_huge
MAPPED = Qwen2VL.from_pretrained.__func__


def read_linears(cls, *args, map_linears=False, **kwargs):
    return MAPPED(cls, *args, **kwargs)


# variant: (empty_huge, Qwen2VL.from_pretrained) while it loads
VARIANTS = {
    "shipped": (HUGE, MAPPED),
    "plain pages": (lambda shape, dtype: torch.empty(shape, dtype=dtype), MAPPED),
    "read, no map": (HUGE, read_linears),
}
PAGES = ("shipped", "plain pages")


def first_touch_gbs(nbytes: int = 512 << 20) -> dict[str, float]:
    """GB/s of writing fresh memory on 4 KiB pages and on huge pages (what a load's copies pay on
    top of the copy: ~18 GB/s rewriting memory already touched, on this VM)."""
    rates = {}
    for name, make in (("4K", lambda: torch.empty(nbytes, dtype=torch.uint8)),
                       ("huge", lambda: HUGE((nbytes,), torch.uint8))):
        start = time.perf_counter()
        make().fill_(1)
        rates[name] = nbytes / (time.perf_counter() - start) / 1e9
    return rates


def load(folder: str, variant: str) -> tuple[LLM, float]:
    gemm.empty_huge, from_pretrained = VARIANTS[variant]
    Qwen2VL.from_pretrained = classmethod(from_pretrained)
    try:
        start = time.perf_counter()
        llm = LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=0.5)
        return llm, time.perf_counter() - start
    finally:
        gemm.empty_huge, Qwen2VL.from_pretrained = HUGE, classmethod(MAPPED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the cached random 2B, built if missing)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    folder = args.model or str(random_checkpoint("2b"))
    times = {name: [] for name in VARIANTS}
    print("first touch of fresh memory before:", ", ".join(f"{k} {v:.2f} GB/s" for k, v in first_touch_gbs().items()))
    for rep in range(args.reps):
        for name in VARIANTS if rep % 2 == 0 else reversed(VARIANTS):
            llm, seconds = load(folder, name)
            times[name].append(seconds)
            del llm
            gc.collect()
    print("first touch of fresh memory after:", ", ".join(f"{k} {v:.2f} GB/s" for k, v in first_touch_gbs().items()))
    for name, xs in times.items():
        print(f"load, {name:<12} {median(xs)} s")
    if not args.decode:
        return
    llms = {name: load(folder, name)[0] for name in PAGES}
    rates = {name: [] for name in PAGES}
    for rep in range(args.reps):
        for name in PAGES if rep % 2 == 0 else PAGES[::-1]:
            before = memory_gbs(3)[1]
            rates[name].append(engine_single(llms[name], rep + 1, 48)[1])
            after = memory_gbs(3)[1]
            print(f"decode, {name:<12} {rates[name][-1]:6.2f} tok/s  read probe {before:.1f} / {after:.1f} GB/s")
    for name, xs in rates.items():
        print(f"decode, {name:<12} median {statistics.median(xs):6.2f} tok/s")


if __name__ == "__main__":
    main()
