"""Single-stream decode speed of GPTQ checkpoints against our own in-memory quantization of the same
weights, through the engine (2B shapes, CPU).

The GPTQ checkpoints are the 2B random one written by `qwen2vl quantize` (GPTQ's v1 format, as Qwen's;
built once under .cache/): `gptq` with `--method int4-g128` (Qwen's GPTQ-Int4 layout, repacked into
Int4Linear), `gptq-int8-g128` with `--method int8-g128` (Qwen's GPTQ-Int8 layout: 8 bits, symmetric,
groups of 128, repacked into Int8GroupLinear). Like Qwen's, they quantize the decoder's linears and
leave the (tied) lm_head in bf16, so the like-for-like baselines are our `int4-g128` and `int8` with the
head kept in bf16 too (`int4-g128-bf16-head`, `int8-bf16-head`); `int4-g128` and `int8` as
`LLM(quantization=...)` runs them also quantize the head (15% of the 2B's weights), for reference.
One process holds every LLM; each repetition runs every one in turn, and ratios come from runs
seconds apart (the memory speed drifts): printed per mode the median tokens/s and the median of
the per-repetition ratios to the first mode.

    python -m benchmarks.gptq_decode [--reps 5] [--steps 32] [--modes gptq int4-g128-bf16-head int4-g128]
    python -m benchmarks.gptq_decode --modes gptq-int8-g128 int8-bf16-head int8
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import statistics
import subprocess
import sys
import unittest.mock

import torch

from benchmarks.bandwidth import probed
from benchmarks.engine_cpu import engine_decode_rate
from qwen2vl import LLM
from qwen2vl.backends.quant import quantize_model

GPTQ_MODES = {"gptq": "int4-g128", "gptq-int8-g128": "int8-g128"}  # mode -> `qwen2vl quantize --method`


def gptq_checkpoint(folder, method: str):
    """The 2B random checkpoint quantized by `qwen2vl quantize --method METHOD`, under .cache/, built once."""
    out = folder.parent / (folder.name + f"-gptq-{method}")
    with open(folder.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():  # written whole under another name, then renamed
            tmp = folder.parent / f".{out.name}.tmp"
            subprocess.run([sys.executable, "-m", "qwen2vl", "quantize", str(folder), "--method", method,
                            "--output", str(tmp)], check=True)
            tmp.rename(out)
    return out


def load(folder, mode: str) -> LLM:
    kw = dict(dtype="bfloat16", device="cpu", kv_cache_gib=0.5)
    if mode in GPTQ_MODES:
        return LLM(str(gptq_checkpoint(folder, GPTQ_MODES[mode])), **kw)
    if mode.endswith("-bf16-head"):
        keep_head = functools.partial(quantize_model, include_head=False)
        with unittest.mock.patch("qwen2vl.backends.cpu.backend.quantize_model", keep_head):
            return LLM(str(folder), quantization=mode.removesuffix("-bf16-head"), **kw)
    return LLM(str(folder), quantization=mode, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["gptq", "int4-g128-bf16-head", "int4-g128"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    from benchmarks.random_checkpoint import random_checkpoint
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    llms = {m: load(folder, m) for m in args.modes}
    seed = iter(range(5000, 100000))
    for llm in llms.values():  # warm-up: first calls build kernels and touch every page
        engine_decode_rate(llm, [next(seed)], 4)
    rates = {m: [] for m in llms}
    reads = {m: [] for m in llms}
    for _ in range(args.reps):
        for m, llm in llms.items():
            rate, before, after = probed(engine_decode_rate, llm, [next(seed)], args.steps)
            rates[m].append(rate)
            reads[m].append(min(before, after))
    first = args.modes[0]
    print(f"\ndecode, 1 request, {args.steps} steps, {args.reps} repetitions (read probe GB/s in brackets); "
          f"ratios: median of each repetition's run over {first}'s")
    for m, r in rates.items():
        paired = [x / b for x, b in zip(r, rates[first])]
        print(f"{m:20}{statistics.median(r):8.2f} tok/s  paired {statistics.median(paired):5.3f}x {first}  "
              f"[{', '.join(f'{x:.2f} at {g:.0f}' for x, g in zip(r, reads[m]))}]")
        if m != first:  # the figure: GPTQ's speed as a share of ours
            inverse = [b / x for x, b in zip(r, rates[first])]
            print(f"{'':20}{first} runs at {statistics.median(inverse):.3f}x {m} "
                  f"[{', '.join(f'{x:.3f}' for x in inverse)}]")


if __name__ == "__main__":
    main()
