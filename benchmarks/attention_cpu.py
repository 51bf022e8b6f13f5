"""The CPU's attention at the 2B's time-to-first-token shapes, variants alternating in one process:

- decoder prefill (283 tokens or --prefill-tokens, 12 query and 2 kv heads of 128, bf16): paged_attention.varlen
  through SDPA's math path (3-D inputs: the default where bf16 matmuls are native) against its fused kernel
  (4-D) in bf16 (what AMX runs, and matmul="int8" with bf16 matmuls) and on float32 copies (what CPUs without
  bf16 matmuls run, the int8 knob too), with each one's relative error against float64;
- vision attention (1024 patches, 16 heads of 80, float32 as the tower computes below AVX-512 BF16):
  attention._matmul_attention taking 2 or 4 heads a slab (the same bits) against SDPA's fused kernel (what
  an Intel CPU runs); in bf16, plain matmuls against SDPA's fused kernel (what a bf16 model runs with AMX).

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.attention_cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.cpu_tier import median
from qwen2vl.attention import _matmul_attention, block_diagonal_attention
from qwen2vl.backends.paged_attention import PagedBatch, varlen


def alternate(fns: dict, reps: int) -> dict[str, list[float]]:
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def report(title: str, times: dict[str, list[float]], layers: int) -> None:
    first = next(iter(times))
    print(title)
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[first])]
        print(f"  {name:28} {median([1e3 * t for t in ts])} ms a layer, x{layers} "
              f"{layers * statistics.median(ts):.2f} s, / {first} pair by pair {statistics.median(ratios):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=283, help="the decoder prefill's length (283: the 2B's "
                    "448x448 image + question)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    n = args.prefill_tokens
    q, k, v = (torch.randn(n, h, 128, generator=g).bfloat16() for h in (12, 2, 2))
    # one sequence, nothing cached: varlen attends over the fresh k/v (the cache is not read)
    batch = PagedBatch(torch.arange(n), [0], [n], [n], torch.arange(n)[None], torch.tensor([n]))
    ref = varlen(q.double(), k.double(), v.double(), None, None, batch)
    paths = {"math path": lambda: varlen(q, k, v, None, None, batch),
             "fused in bf16 (AMX)": lambda: varlen(q, k, v, None, None, batch, True),
             "fused on float32 copies": lambda: varlen(q, k, v, None, None, batch, True, torch.float32)}
    for name, fn in paths.items():
        print(f"decoder prefill, {name}: relative error vs float64 {(fn().double() - ref).norm() / ref.norm():.2e}")
    report(f"decoder prefill attention, {n} tokens, bf16 (float32 copies: where bf16 matmuls are emulated):",
           alternate(paths, args.reps), 28)

    q, k, v = (torch.randn(1024, 16, 80, generator=g) for _ in range(3))
    assert torch.equal(_matmul_attention(q, k, v, heads=2), _matmul_attention(q, k, v, heads=4))
    # float32, as the tower computes without bf16 matmuls: SDPA's fused kernel is what the CPU backend asks for
    # on Intel CPUs (backend.py's sdpa_vision); AMD keeps the plain matmuls until this says otherwise
    report("vision attention, 1024 patches, float32:", alternate(
        {"2 heads a slab": lambda: _matmul_attention(q, k, v, heads=2).reshape(1024, -1),
         "4 heads a slab": lambda: _matmul_attention(q, k, v, heads=4).reshape(1024, -1),
         "SDPA fused (Intel)": lambda: block_diagonal_attention(q, k, v, [0, 1024], matmul_min=0)}, args.reps), 32)

    # bf16, as the tower computes with bf16 matmuls: plain matmuls (CPU_MATMUL_ATTENTION_MIN) or SDPA's
    # fused kernel (what the CPU backend asks for with AMX), each one's error against float64
    q, k, v = (x.bfloat16() for x in (q, k, v))
    ref = block_diagonal_attention(*(x.double() for x in (q, k, v)), [0, 1024], matmul_min=0)
    paths = {"matmuls, 4 heads a slab": lambda: block_diagonal_attention(q, k, v, [0, 1024]),
             "SDPA fused (AMX)": lambda: block_diagonal_attention(q, k, v, [0, 1024], matmul_min=0)}
    for name, fn in paths.items():
        print(f"vision, {name}: relative error vs float64 {(fn().double() - ref).norm() / ref.norm():.2e}")
    report("vision attention, 1024 patches, bf16:", alternate(paths, args.reps), 32)


if __name__ == "__main__":
    main()
