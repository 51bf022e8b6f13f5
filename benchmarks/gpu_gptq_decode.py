"""A GPTQ-Int4 checkpoint (groups of 128) on a CUDA GPU against bf16: the W4A16 kernel alone at the 2B's
linear shapes, then batch-1 decode through the engine. The issue's goal: decode >= 1.5x bf16.

1. The kernel (backends/cuda/triton_int_gemm.py) for each decoder linear of the 2B (fused q/k/v, o, fused
   gate/up, down; random 4-bit codes in groups of 128, fp16 scales, as a GPTQ checkpoint repacks) at 1 row
   (decode) and `--prefill` rows, against F.linear (cuBLAS) on the same weights in bf16. Each side is a
   CUDA graph of 20 calls that cycle through enough copies of the weights to overflow the L2 cache (the
   decode step reads every weight once); the two graphs alternate `--reps` times; printed: median us per
   call, the weight bytes read per second, the median per-repetition ratio, and the kernel's largest
   error against the bf16 product (a kernel this GPU compiles wrongly shows here first). `--sweep`: the
   decode shapes again for each block width x split along K, to tune triton_int_gemm's heuristics.
2. The engine: the 2B random checkpoint, built here in bf16 with transformers (as benchmarks/gpu_check.py),
   and its GPTQ-Int4 g128 copy written by `qwen2vl quantize --method int4-g128` (GPTQ's v1 format, as
   Qwen's GPTQ-Int4; the head stays bf16 as there), both as LLM with decode CUDA graphs in this one
   process; `--reps` repetitions alternate the two, each timing `--steps` decode steps of one request
   after an image prompt; printed: tok/s medians and the median of the per-repetition ratios gptq / bf16.

Needs a CUDA GPU (exits saying so without one). Not run yet: no GPU was lent when the kernel was written.

    python -m benchmarks.gpu_gptq_decode --tokenizer .cache/qwen_tokenizer [--reps 5] [--steps 64] [--sweep]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}  # (N, K)
CALLS = 20  # calls per graph
L2_SPAN = 256 << 20  # bytes of weights a graph cycles through: several times an H100/H200's L2


def graph_of(fns) -> torch.cuda.CUDAGraph:
    """One CUDA graph calling fns[i % len(fns)] for i < CALLS (each run once first: Triton compiles)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    return graph


def per_call(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / CALLS


def linears(n: int, k: int):
    """(int4 PackedIntLinears, bf16 weights): copies of one random weight, enough of each to span L2_SPAN."""
    from qwen2vl.backends.cuda.triton_int_gemm import int_gemm
    from qwen2vl.backends.packed_linear import PackedIntLinear
    from qwen2vl.gptq import IntWeight

    g = torch.Generator().manual_seed(n + k)
    w = IntWeight(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                  torch.full((n, k // 128), 8, dtype=torch.int16),
                  (torch.rand(n, k // 128, generator=g) / 64).half().float(), 128, 4)
    packed = PackedIntLinear.from_int_weight(w, None, torch.device("cuda"), int_gemm)
    dense = w.dequantize().to("cuda", torch.bfloat16)
    ours = [packed] + [copy.deepcopy(packed) for _ in range(-(-L2_SPAN // (n * k // 2)) - 1)]
    theirs = [dense] + [dense.clone() for _ in range(-(-L2_SPAN // (n * k * 2)) - 1)]
    return ours, theirs


def kernel_vs_cublas(rows: int, reps: int) -> None:
    print(f"\nW4A16 kernel vs cuBLAS bf16, {rows} row(s), 4-bit groups of 128; median of {reps} alternations")
    for name, (n, k) in SHAPES.items():
        ours, theirs = linears(n, k)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, theirs[0]).float()
        err = (ours[0](x).float() - want).abs().max().item() / want.abs().max().item()
        g_ours = graph_of([lambda m=m, x=x: m(x) for m in ours])
        g_theirs = graph_of([lambda w=w, x=x: F.linear(x, w) for w in theirs])
        t_ours, t_theirs = [], []
        for _ in range(reps):
            t_ours.append(per_call(g_ours))
            t_theirs.append(per_call(g_theirs))
        bytes_ours = n * k // 2 + n * (k // 128) * 3  # codes, fp16 scales, uint8 zeros
        ratio = statistics.median(b / a for a, b in zip(t_ours, t_theirs))
        a, b = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"{name:8} N={n:5} K={k:5}  ours {a * 1e6:8.2f} us ({bytes_ours / a / 1e9:6.0f} GB/s)  "
              f"bf16 {b * 1e6:8.2f} us ({n * k * 2 / b / 1e9:6.0f} GB/s)  bf16/ours {ratio:5.2f}x  "
              f"max error / max |y| {err:.2e}")


def sweep(reps: int) -> None:
    from qwen2vl.backends.cuda.triton_int_gemm import int_gemm

    print("\ndecode (1 row): us per call for block width x split along K (None: the heuristic)")
    splits = (None, 1, 2, 4, 8, 16, 32)
    print(f"{'':16}" + "".join(f"{str(s):>9}" for s in splits))
    for name, (n, k) in SHAPES.items():
        ours, _ = linears(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for block_n in (32, 64, 128, 256):
            row = []
            for split in splits:
                graph = graph_of([lambda m=m, s=split, b=block_n, x=x: int_gemm(
                    x, m.qweight, m.scales, m.zeros, None, None, 4, 128, block_n=b, split=s) for m in ours])
                row.append(statistics.median(per_call(graph) for _ in range(reps)))
            print(f"{name:8} BN={block_n:3}  " + "".join(f"{t * 1e6:9.2f}" for t in row))


def checkpoints(tokenizer: Path) -> tuple[Path, Path]:
    """The 2B random bf16 checkpoint and its GPTQ-Int4 g128 copy under /tmp, built once."""
    from benchmarks.gpu_check import build_checkpoint

    folder, gptq = Path("/tmp/qwen2vl-2b-random"), Path("/tmp/qwen2vl-2b-random-gptq-int4-g128")
    if not (folder / "config.json").is_file():
        build_checkpoint(folder, tokenizer)  # the transformers model it returns is dropped at once
        torch.cuda.empty_cache()
    if not (gptq / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "qwen2vl", "quantize", str(folder), "--method", "int4-g128",
                        "--output", str(gptq)], check=True)
    return folder, gptq


def engine(tokenizer: Path, reps: int, steps: int) -> None:
    from benchmarks.engine_cpu import engine_decode_rate
    from qwen2vl import LLM
    from qwen2vl.backends.packed_linear import PackedIntLinear

    folder, gptq = checkpoints(tokenizer)
    llms = {m: LLM(str(f), dtype="bfloat16", device="cuda", kv_cache_gib=2.0)
            for m, f in (("gptq", gptq), ("bf16", folder))}
    on_kernel = sum(isinstance(m, PackedIntLinear) for m in llms["gptq"].model.modules())
    print(f"\nengine: {llms['gptq'].model.backend.describe()}; {on_kernel} linears on the W4A16 kernel")
    seed = iter(range(5000, 100000))
    for llm in llms.values():  # warm-up
        engine_decode_rate(llm, [next(seed)], 8)
    rates = {m: [] for m in llms}
    for _ in range(reps):
        for m, llm in llms.items():
            rates[m].append(engine_decode_rate(llm, [next(seed)], steps))
    ratios = [a / b for a, b in zip(rates["gptq"], rates["bf16"])]
    print(f"batch-1 decode, {steps} steps, {reps} repetitions: gptq {statistics.median(rates['gptq']):.1f} tok/s, "
          f"bf16 {statistics.median(rates['bf16']):.1f} tok/s; gptq / bf16 median {statistics.median(ratios):.3f}x "
          f"[{', '.join(f'{r:.3f}' for r in ratios)}] (goal >= 1.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".cache/qwen_tokenizer")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512, help="rows of the kernel's prefill measurement")
    ap.add_argument("--sweep", action="store_true", help="time block widths x splits for decode")
    ap.add_argument("--kernel-only", action="store_true", help="skip the engine (no checkpoint to build)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_gptq_decode needs a CUDA GPU (torch.cuda.is_available() is False here); "
                 "the kernel's tests run on the CPU: tests/test_triton_int_gemm.py")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for rows in (1, args.prefill):
        kernel_vs_cublas(rows, args.reps)
    if args.sweep:
        sweep(args.reps)
    if not args.kernel_only:
        engine(Path(args.tokenizer), args.reps, args.steps)


if __name__ == "__main__":
    main()
