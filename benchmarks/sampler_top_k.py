"""The sampler's top-k over float32 logits [B, 151,936]: torch.topk, the torch block top-k
(backends/top_k.py), the CPU kernel (csrc/top_k.c), and the greedy argmax as the floor (one read).

    python -m benchmarks.sampler_top_k
    python -m benchmarks.sampler_top_k --batches 32 128 --k 50 --reps 30

Random normal logits, one thread. The four run in turn on the same rows, --reps times; each figure
is the median of this thread's CPU time per call (other jobs on the machine do not count), and the
ratios are taken against the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qwen2vl.backends.cpu import sample_ops
from qwen2vl.backends.top_k import top_k as block_top_k
from qwen2vl.engine.sampler import argmax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lib = sample_ops.library()
    print(f"torch {torch.__version__}, 1 thread, k {args.k}, kernel: {lib.variant if lib else 'not built here'}")
    for batch in args.batches:
        x = torch.randn(batch, 151936, generator=torch.Generator().manual_seed(batch)) * 2
        ways = {"torch.topk": lambda x: x.topk(args.k), "block (torch)": lambda x: block_top_k(x, args.k),
                "argmax (greedy)": argmax}
        if lib is not None:
            ways["kernel"] = lambda x: sample_ops.top_k(x, args.k)
        times = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, f in ways.items():
                t0 = time.thread_time()
                f(x)
                times[name].append(time.thread_time() - t0)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        base = ms.get("kernel")
        print(f"\nbatch {batch}")
        for name, m in ms.items():
            print(f"  {name:16} {m:8.3f} ms" + (f"   {m / base:.2f}x the kernel" if base else ""))


if __name__ == "__main__":
    main()
