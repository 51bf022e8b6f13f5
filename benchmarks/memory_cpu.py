"""Load time and peak memory of the engine on the real Qwen2-VL-2B shapes (random weights, CPU).

Each configuration runs in a fresh subprocess, so its peak resident set (ru_maxrss) is its own:
load the checkpoint through `LLM` (swapping in fast or quantized linears included), then serve one
448x448 image request of 32 tokens, which runs the vision tower, a prefill and decode through
the paged KV cache. Printed against the budget the issue sets: checkpoint weights + the
configured KV cache. The interpreter and torch themselves (~0.4 GB) count against it too.

    python -m benchmarks.memory_cpu [--quantization none int8 int4] [--kv-cache-gib 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1 << 30


def measure(folder: str, quantization: str | None, kv_cache_gib: float) -> dict:
    """Runs inside the child process."""
    import torch

    from benchmarks.engine_cpu import conversation
    from qwen2vl import LLM, SamplingParams

    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=kv_cache_gib, quantization=quantization)
    load_s = time.perf_counter() - start
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = llm.chat([conversation(0)], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert len(out[0].token_ids) == 32
    return dict(load_s=load_s, request_s=time.perf_counter() - start, base=base, after_load=after_load,
                peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, q = args.child
        print(json.dumps(measure(folder, None if q == "none" else q, args.kv_cache_gib)))
        return

    from benchmarks.random_checkpoint import random_checkpoint
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    budget = weights + args.kv_cache_gib * GIB
    print(f"checkpoint {folder}: {weights / GIB:.2f} GiB of bf16 weights; KV cache {args.kv_cache_gib} GiB; "
          f"budget (weights + KV) {budget / GIB:.2f} GiB")
    print(f"{'quantization':>12}{'load s':>8}{'request s':>11}{'RSS torch':>11}{'RSS loaded':>12}"
          f"{'peak RSS':>10}{'peak / budget':>15}")
    for q in args.quantization:
        child = subprocess.run([sys.executable, "-m", "benchmarks.memory_cpu", "--kv-cache-gib",
                                str(args.kv_cache_gib), "--child", str(folder), q],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{q:>12}{r['load_s']:8.1f}{r['request_s']:11.1f}{r['base'] / GIB:10.2f}G{r['after_load'] / GIB:11.2f}G"
              f"{r['peak'] / GIB:9.2f}G{r['peak'] / budget:15.2f}", flush=True)


if __name__ == "__main__":
    main()
