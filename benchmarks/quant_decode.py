"""Single-stream decode speed of int8 / int4 weights against bf16, through the engine (2B shapes, CPU).

One process holds the `LLM`s (bf16 FastLinears, `quantization="int8"`, `"int4"`, and on request
`bf16-onednn`: bf16 FastLinears on oneDNN instead of our bf16 kernel; `int8-int_gemv`, `int4-int_gemv`: the
quantized models with the C decode step's batches of 32 rows and more kept off the AMX tiles); each
repetition runs every one in turn (this VM's memory speed drifts, so ratios come from runs seconds
apart): one request with its own 448x448 image, prefilled, then `--steps` decode steps timed.
Printed: tokens/s per run with the read probe around it (the lower of before and after: this VM
switches between a fast and a slow memory phase), the median, and its ratio to bf16's; the ratio
of each repetition's run to bf16's in the same repetition, and their median; with `--min-read`,
the same over the repetitions run entirely in the phase above that read rate.

    python -m benchmarks.quant_decode [--reps 3] [--steps 32] [--batch 1] [--min-read 70] \\
        [--modes bf16 int8 int4 bf16-onednn int8-int_gemv int4-int_gemv]
"""

from __future__ import annotations

import argparse
import statistics
import unittest.mock

import torch

from benchmarks.bandwidth import probe, probed
from benchmarks.engine_cpu import engine_decode_rate, step_bytes
from qwen2vl import LLM

KV_GIB = 2.0  # room for 64 requests of a 448x448 image each


def load(folder: str, mode: str) -> LLM:
    if mode.endswith("-int_gemv"):  # int8 / int4 with every decode batch on int_gemv, as before the AMX tiles took
        with unittest.mock.patch("qwen2vl.backends.cpu.gemm.amx_codes_library", return_value=None):  # 32+ rows
            return LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=KV_GIB, quantization=mode.split("-")[0])
    if mode == "bf16-onednn":  # FastLinear's other path, as on a CPU without AVX-512 BF16
        with unittest.mock.patch("qwen2vl.backends.cpu.linear.kernel_takes", return_value=False):
            return LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=KV_GIB)
    quantization = None if mode == "bf16" else mode
    return LLM(folder, dtype="bfloat16", device="cpu", kv_cache_gib=KV_GIB, quantization=quantization)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    ap.add_argument("--min-read", type=float, default=0.0,
                    help="also report the paired ratios of repetitions whose runs all had the read probe above this "
                         "(GB/s): one memory phase only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from benchmarks.random_checkpoint import random_checkpoint
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = str(random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir()))
    llms = {m: load(folder, m) for m in args.modes}
    print(f"probe before: {probe()}")
    seed = iter(range(5000, 100000))
    for llm in llms.values():  # warm-up: first calls build kernels and touch every page
        engine_decode_rate(llm, [next(seed)], 4)
    rates = {m: [] for m in llms}
    reads = {m: [] for m in llms}  # the read probe around each run: which memory phase it ran in
    for _ in range(args.reps):
        for m, llm in llms.items():
            seeds = [next(seed) for _ in range(args.batch)]
            rate, before, after = probed(engine_decode_rate, llm, seeds, args.steps)
            rates[m].append(rate)
            reads[m].append(min(before, after))
    print(f"probe after: {probe()}")
    bf16_bytes = step_bytes(next(iter(llms.values())).model)
    print(f"\ndecode, {args.batch} request(s), {args.steps} steps, median of {args.reps} (runs in brackets); "
          f"a bf16 step streams {bf16_bytes / 1e9:.2f} GB of weights")
    first = args.modes[0]
    base = statistics.median(rates[first])
    for m, r in rates.items():
        med = statistics.median(r)
        # each repetition's ratio to the first mode's run seconds before it: robust to the memory
        # speed drifting between repetitions, which the ratio of medians is not
        paired = [x / b for x, b in zip(r, rates[first])]
        print(f"{m:6}{med:8.2f} tok/s  {med / base:5.2f}x {first}   "
              f"[{', '.join(f'{x:.2f} at {g:.0f}' for x, g in zip(r, reads[m]))} GB/s]   "
              f"paired: median {statistics.median(paired):.2f}x [{', '.join(f'{x:.2f}' for x in paired)}]")
    if args.min_read:
        phase = [i for i in range(args.reps) if all(reads[m][i] > args.min_read for m in llms)]
        print(f"repetitions with every run's read probe above {args.min_read:.0f} GB/s: {len(phase)} of {args.reps}")
        for m, r in rates.items():
            if phase:
                paired = [r[i] / rates[first][i] for i in phase]
                print(f"{m:6} paired, that phase only: median {statistics.median(paired):.2f}x "
                      f"[{', '.join(f'{x:.2f}' for x in paired)}]")


if __name__ == "__main__":
    main()
