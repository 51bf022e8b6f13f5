"""What the load's memory choices cost at load (and give at decode): the packed weights mapped from
their cache file, huge pages for the packed decoder weights, and mapping the linears' weights from
the file rather than reading them.

    python -m benchmarks.load_pages --reps 3 [--model DIR] [--decode]

Loads the 2B-shaped checkpoint with `LLM(dtype="bfloat16")` alternately as shipped (the packed
weights mapped from packed_cache.py's file, written by one untimed load first into a folder of
this benchmark's own), packed in memory (the cache off: linears mapped from the checkpoint,
packing.empty_huge: fresh mappings advised MADV_HUGEPAGE), with plain torch.empty memory for the packed
weights, and with the linears read into fresh memory (loader.py before the maps), `--reps` times
each, and prints the load times; with `--decode`, the first two stay loaded and one 48-token
stream alternates between them (time to first token of its fresh image, decode tok/s), with the
read probe around each run. On a VM the first touch of fresh memory can cost a host fault (free
memory handed back to the host), which is what the load pays.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import torch

from benchmarks.bandwidth import memory_gbs
from benchmarks.cpu_tier import median
from benchmarks.engine_cpu import engine_single
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import packed_cache, packing
from qwen2vl.model import Qwen2VL

HUGE = packing.empty_huge
MAPPED = Qwen2VL.from_pretrained.__func__


def read_linears(cls, *args, map_linears=False, **kwargs):
    return MAPPED(cls, *args, **kwargs)


CACHE = tempfile.mkdtemp(prefix="qwen2vl-load-pages-")  # the shipped variant's packed cache
# variant: (empty_huge, Qwen2VL.from_pretrained, $QWEN2VL_PACKED_CACHE) while it loads
VARIANTS = {
    "shipped": (HUGE, MAPPED, CACHE),
    "in memory": (HUGE, MAPPED, "0"),
    "plain pages": (lambda shape, dtype: torch.empty(shape, dtype=dtype), MAPPED, "0"),
    "read, no map": (HUGE, read_linears, "0"),
}
PAGES = ("shipped", "in memory")


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
    packing.empty_huge, from_pretrained, os.environ[packed_cache.ENV] = VARIANTS[variant]
    Qwen2VL.from_pretrained = classmethod(from_pretrained)
    try:
        start = time.perf_counter()
        llm = LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=0.5)
        return llm, time.perf_counter() - start
    finally:
        packing.empty_huge, Qwen2VL.from_pretrained = HUGE, classmethod(MAPPED)
        del os.environ[packed_cache.ENV]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the cached random 2B, built if missing)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    folder = args.model or str(random_checkpoint("2b"))
    times = {name: [] for name in VARIANTS}
    load(folder, "shipped")  # writes the cache file the shipped variant maps
    packed_cache.wait_for_writes()  # on its own thread: not in a timed load
    gc.collect()
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
    for i, llm in enumerate(llms.values()):
        engine_single(llm, 1000 + i, 2)  # warm-up: kernels built, the mapped pages faulted in
    rates, ttfts = {name: [] for name in PAGES}, {name: [] for name in PAGES}
    for rep in range(args.reps):
        for name in PAGES if rep % 2 == 0 else PAGES[::-1]:
            before = memory_gbs(3)[1]
            ttft, rate = engine_single(llms[name], rep + 1, 48)
            after = memory_gbs(3)[1]
            rates[name].append(rate)
            ttfts[name].append(ttft)
            print(f"decode, {name:<12} {rate:6.2f} tok/s  TTFT {ttft:5.2f} s  "
                  f"read probe {before:.1f} / {after:.1f} GB/s")
    for name, xs in rates.items():
        ttft = statistics.median(ttfts[name])
        print(f"decode, {name:<12} median {statistics.median(xs):6.2f} tok/s  TTFT {ttft:5.2f} s")


if __name__ == "__main__":
    try:
        main()
    finally:
        for file in os.listdir(CACHE):
            os.unlink(os.path.join(CACHE, file))
        os.rmdir(CACHE)
