"""Where a CPU load's seconds go: `LLM(dtype="bfloat16")` split into its phases.

    python -m benchmarks.load_profile --reps 3 [--model DIR] [--cache on|off|both]

Each load times, by wrapping the functions that do them: reading the checkpoint (the model built on
the meta device, the small tensors read, the linears mapped), fusing q/k/v, packing the linears
(packing.pack_bf16: the transposes into fresh memory) by group (decoder on huge pages, lm_head, the
vision tower on plain pages), mapping them from packed_cache.py's file instead, writing that file,
the tokenizer, and the rest (processor, engine, KV cache). Loads alternate between the packed cache
on (its file written by one untimed load first, in a folder of this benchmark's own) and off, and
free the previous model first, as benchmarks/cpu_tier.py does: on a VM that hands freed memory back
to its host, fresh memory is touched again every time.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import tempfile
import time

import torch

from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import packed_cache, packing
from qwen2vl.backends.cpu.packed_cache import PackedCache
from qwen2vl.model import Qwen2VL
from qwen2vl.processing import tokenizer
from qwen2vl.text import Attention

SECONDS: dict[str, float] = collections.defaultdict(float)


def timing(owner, attr: str, phase):
    """Wrap owner.attr so its seconds add to SECONDS[phase(*args)]."""
    fn = getattr(owner, attr)
    plain = getattr(fn, "__func__", fn)

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            SECONDS[phase(*args, **kwargs)] += time.perf_counter() - start

    setattr(owner, attr, classmethod(wrapped) if hasattr(fn, "__func__") else wrapped)


def pack_group(w, huge_pages=True):
    return "pack: lm_head" if w.shape[0] > 100_000 else "pack: decoder (huge)" if huge_pages else "pack: vision (4K)"


timing(Qwen2VL, "from_pretrained", lambda *a, **k: "read checkpoint")
timing(Attention, "fuse_qkv", lambda *a: "fuse q/k/v")
timing(packing, "pack_bf16", pack_group)
timing(PackedCache, "_read", lambda *a: "cache: open and map")
timing(PackedCache, "_save", lambda *a: "cache: write (its own thread)")
timing(tokenizer.Tokenizer, "from_pretrained", lambda *a: "tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the cached random 2B)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cache", choices=["on", "off", "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder = args.model or str(random_checkpoint("2b"))
    where = tempfile.mkdtemp(prefix="qwen2vl-load-profile-")
    modes = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.cache]
    runs = {mode: [] for mode in modes}
    try:
        os.environ[packed_cache.ENV] = where
        if "on" in modes:
            LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=1.0)  # writes the file
            packed_cache.wait_for_writes()  # on its own thread: not in a timed load
        held = []  # the last model, freed before the next load
        for rep in range(args.reps):
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                held.clear()
                gc.collect()
                os.environ[packed_cache.ENV] = where if mode == "on" else "0"
                SECONDS.clear()
                start = time.perf_counter()
                held.append(LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=1.0))
                total = time.perf_counter() - start
                phases = dict(SECONDS)
                phases["rest"] = total - sum(phases.values())
                phases["total"] = total
                runs[mode].append(phases)
                print(f"cache {mode:3} " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
    finally:
        for file in os.listdir(where):
            os.unlink(os.path.join(where, file))
        os.rmdir(where)
    for mode, phases in runs.items():
        keys = dict.fromkeys(k for p in phases for k in p)
        print(f"\ncache {mode}, medians of {len(phases)} loads (s):")
        for k in keys:
            print(f"  {k:24}{statistics.median(p.get(k, 0.0) for p in phases):7.2f}")


if __name__ == "__main__":
    main()
