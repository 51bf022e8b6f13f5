"""Memory-bandwidth and GEMM probe, the yardstick for memory-bound decode numbers.

`probe()` measures, in the calling process and with torch's current thread count:
- copy: `dst.copy_(src)` of a 1 GiB float32 tensor, counted as read + write bytes;
  both tensors on transparent huge pages where Linux allows it, like the packed weights
  (`qwen2vl.backends.cpu.packing.empty_huge`): the fastest reads this machine gives, so the honest bound;
- read: `src.sum()` of the same tensor, counted as bytes read (the bound a decode GEMV can reach);
- gemm: bf16 `F.linear(x[2048, 1536], W[8960, 1536])` in GFLOP/s (the compute side, for prefill).
This VM's speed drifts and other processes share it, so each figure is a median of `reps` and a
benchmark should call `probe()` right before and after its own timings.

    python -m benchmarks.bandwidth [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen2vl.backends.cpu.packing import empty_huge

GIB = 1 << 30


@dataclass
class Probe:
    copy_gbs: float  # read + write GB/s
    read_gbs: float  # read GB/s
    gemm_gflops: float  # bf16 GEMM

    def __str__(self) -> str:
        return f"copy {self.copy_gbs:.1f} GB/s, read {self.read_gbs:.1f} GB/s, bf16 GEMM {self.gemm_gflops:.0f} GFLOP/s"


def others_cpu_ticks() -> int:
    """CPU time (clock ticks) used since boot by every process but this one, 0 where /proc is missing.

    A benchmark reads it before and after a timed round: other processes' ticks in between mean
    the round shared the cores (on 2 cores one busy neighbour stalls every 2-thread parallel
    region for a whole scheduler slice), so the round is discarded.
    """
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq - int(fields[11]) - int(fields[12])  # minus utime, stime
    except (OSError, ValueError, IndexError):
        return 0


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up: page faults, thread pool, caches of small operands
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_gbs(reps: int) -> tuple[float, float]:
    """(copy, read) GB/s over a 1 GiB float32 tensor."""
    # written, so its pages are real (an untouched tensor reads the zero page)
    src = empty_huge((GIB // 4,), torch.float32).fill_(1)
    dst = empty_huge((GIB // 4,), torch.float32).zero_()
    copy = 2 * GIB / median_seconds(lambda: dst.copy_(src), reps) / 1e9
    read = GIB / median_seconds(lambda: src.sum(), reps) / 1e9
    return copy, read


def probed(fn, *args):
    """(fn(*args), read GB/s right before it, read GB/s right after it): this VM's memory switches
    between a fast and a slow phase within minutes, so each timing carries the probes around it."""
    before = memory_gbs(3)[1]
    out = fn(*args)
    return out, before, memory_gbs(3)[1]


def gemm_gflops(reps: int) -> float:
    x = torch.randn(2048, 1536, dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, dtype=torch.bfloat16)
    return 2 * 2048 * 1536 * 8960 / median_seconds(lambda: F.linear(x, w), reps) / 1e9


def probe(reps: int = 7) -> Probe:
    return Probe(*memory_gbs(reps), gemm_gflops(reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {probe(args.reps)}")


if __name__ == "__main__":
    main()
