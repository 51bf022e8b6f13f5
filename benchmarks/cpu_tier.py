"""Issue 14's goals on this CPU tier, side by side in one run: load, time to first token, decode.

Runs at whatever tier the process is given: on a Zen 5, `QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` makes it an AVX2 machine for us, torch and oneDNN alike. On the 2B shapes
(random weights), 2 threads:
- load: `LLM(folder, dtype="bfloat16")` against transformers' from_pretrained in its best dtype here
  (bfloat16 where the CPU has bf16 matmuls, else float32);
- TTFT: a fresh 448x448 image + question (283 prompt tokens), ours against transformers in that dtype;
  where the CPU has AMX tiles, also with bf16_gemm's tiles switched the other way ($QWEN2VL_AMX), run by run;
- TTFT of the int8 and int4 models too (where the AMX tiles take their prefill, also on int_gemv, run by run);
- decode: tokens/s of one stream per mode (bf16, int8, int4), each against the memory-read bound
  (bytes a step reads / the read probe taken around the run); with `--llama DIR` (benchmarks/llama_cpp.sh
  builds it) llama.cpp's llama-bench on DIR's model-{bf16,q8_0,q4_0}.gguf in the same run.
Each figure is the median of `--reps` runs (all runs printed).

    python -m benchmarks.cpu_tier --reps 3 [--llama /work/llama] [--model DIR] [--matmul int8] [--modes]
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.bandwidth import memory_gbs
from benchmarks.cpu_gemm_tier import amx_granted
from benchmarks.engine_cpu import Reference, engine_single, own_weights
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import gemm, isa
from qwen2vl.backends.system import report

STEP_BYTES = {"bf16": 3.09e9, "int8": 1.65e9, "int4": 0.93e9}  # a 2B decode step's weight reads (REFERENCE §6.3)
QUANT = {"bf16": None, "int8": "int8", "int4": "int4"}
LLAMA_FILES = {"bf16": "model-bf16.gguf", "int8": "model-q8_0.gguf", "int4": "model-q4_0.gguf"}


def median(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.2f}  [{', '.join(f'{x:.2f}' for x in xs)}]"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_ours(folder, quantization=None, matmul=None) -> tuple[LLM, float]:
    llm, seconds = timed(lambda: LLM(str(folder), dtype="bfloat16", device="cpu", quantization=quantization,
                                     kv_cache_gib=1.0, matmul=matmul))
    own_weights(llm.model)
    return llm, seconds


def decode_rate(llm: LLM, seeds, tokens: int, reps: int) -> tuple[list[float], list[float]]:
    """(tokens/s, read GB/s around each run) over `reps` single streams."""
    rates, reads = [], []
    for _ in range(reps):
        before = memory_gbs(3)[1]
        rates.append(engine_single(llm, next(seeds), tokens)[1])
        reads.append((before + memory_gbs(3)[1]) / 2)
    return rates, reads


def llama_bench(folder: Path, mode: str, threads: int, reps: int) -> tuple[float, float] | None:
    """(prompt tok/s for 283 tokens, decode tok/s) from llama-bench, or None without the file."""
    gguf = folder / LLAMA_FILES[mode]
    if not gguf.is_file():
        return None
    out = subprocess.run([str(folder / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "283",
                          "-n", "64", "-r", str(reps)], capture_output=True, text=True, check=True).stdout
    rates = [float(m) for m in re.findall(r"\|\s+(?:pp283|tg64)\s+\|\s+([\d.]+)", out)]
    return (rates[0], rates[1]) if len(rates) == 2 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the cached random 2B, built if missing)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per decode run")
    ap.add_argument("--modes", nargs="*", default=["bf16", "int8", "int4"], choices=list(QUANT),
                    help="decode modes (none: no decode runs)")
    ap.add_argument("--matmul", choices=["int8"], help="also load and TTFT LLM(matmul=...) (the vision tower and "
                    "prefill in int8)")
    ap.add_argument("--llama", type=Path, help="folder of benchmarks/llama_cpp.sh (bin/ and the gguf files)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        folder = args.model
    else:
        from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

        folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    print(report(probe=False))
    print(f"model {folder}, {args.reps} repetitions, medians [all runs]\n")
    seeds = iter(range(2000, 100000))  # a fresh picture every run: no cache hits

    ours, ref = {"load s": [], "TTFT s": []}, {"load s": [], "TTFT s": []}
    ref_dtype = torch.bfloat16 if isa.current().native_bf16_matmul else torch.float32
    llm = None
    for _ in range(args.reps):
        del llm
        gc.collect()
        llm, seconds = load_ours(folder)
        ours["load s"].append(seconds)
    engine_single(llm, next(seeds), 2)  # warm-up: kernels built, caches touched
    lib = gemm.bf16_library()
    flipped = None  # where the CPU has AMX tiles: TTFT with them switched the other way, run by run
    if lib is not None and amx_granted(lib):
        flipped = f"TTFT s, AMX tiles {'off' if lib.amx else 'on'}"
        ours[flipped], ref[flipped] = [], ref["TTFT s"]
    for _ in range(args.reps):
        ours["TTFT s"].append(engine_single(llm, next(seeds), 2)[0])
        if flipped:
            lib.bf16_gemm_amx(0 if lib.amx else 1)
            ours[flipped].append(engine_single(llm, next(seeds), 2)[0])
            lib.bf16_gemm_amx(1 if lib.amx else 0)
    processor = llm.processor
    rates = {"bf16": decode_rate(llm, seeds, args.tokens, args.reps)} if "bf16" in args.modes else {}
    del llm
    gc.collect()
    if args.matmul:
        load_key, ttft_key = f"load s, matmul {args.matmul}", f"TTFT s, matmul {args.matmul}"
        ours[load_key], ours[ttft_key], ref[load_key], ref[ttft_key] = [], [], ref["load s"], ref["TTFT s"]
        llm = None
        for _ in range(args.reps):
            del llm
            gc.collect()
            llm, seconds = load_ours(folder, matmul=args.matmul)
            ours[load_key].append(seconds)
        engine_single(llm, next(seeds), 2)
        for _ in range(args.reps):
            ours[ttft_key].append(engine_single(llm, next(seeds), 2)[0])
        del llm
        gc.collect()
    if not args.no_transformers:
        model = None
        for _ in range(args.reps):
            del model
            gc.collect()
            model, seconds = timed(lambda: Reference(folder, processor, ref_dtype))
            ref["load s"].append(seconds)
        model.single(next(seeds), 2)  # warm-up
        for _ in range(args.reps):
            ref["TTFT s"].append(model.single(next(seeds), 2)[0])
        del model
        gc.collect()
    codes = gemm.amx_codes_library() is not None  # the quantized models' prefill rows on the AMX tiles
    for mode in args.modes:
        if mode not in rates:
            llm = load_ours(folder, QUANT[mode])[0]
            engine_single(llm, next(seeds), 2)
            key, off = f"TTFT s, {mode}", f"TTFT s, {mode}, int_gemv prefill"
            ours[key], ref[key] = [], ref["TTFT s"]
            if codes:
                ours[off], ref[off] = [], ref["TTFT s"]
            for _ in range(args.reps):
                ours[key].append(engine_single(llm, next(seeds), 2)[0])
                if codes:  # the same model with its prefill on int_gemv, as before the tiles took it
                    rows, gemm.AMX_CODES_ROWS = gemm.AMX_CODES_ROWS, dict.fromkeys(gemm.AMX_CODES_ROWS, 1 << 30)
                    ours[off].append(engine_single(llm, next(seeds), 2)[0])
                    gemm.AMX_CODES_ROWS = rows
            rates[mode] = decode_rate(llm, seeds, args.tokens, args.reps)
            del llm
            gc.collect()

    print(f"{'':34}{'ours':>8}{'':28}{'transformers ' + str(ref_dtype).split('.')[1]:>24}")
    for key in ours:
        line = f"{key:34}{median(ours[key])}"
        if key == flipped:
            line += f"   over TTFT s: {statistics.median(ours[key]) / statistics.median(ours['TTFT s']):.2f}"
        if ref.get(key):
            ratio = statistics.median(ours[key]) / statistics.median(ref[key])
            line += f"   {median(ref[key])}   ratio {ratio:.2f}"
        print(line)
    print(f"\ndecode, one stream, {args.tokens} tokens: tok/s, and against the read bound (read probe around each run)")
    for mode, (tps, reads) in rates.items():
        bound = [r * 1e9 / STEP_BYTES[mode] for r in reads]
        share = [t / b for t, b in zip(tps, bound)]
        line = f"{mode:6} {median(tps)}  bound {statistics.median(bound):.1f} tok/s, {statistics.median(share):.0%}"
        if args.llama and (theirs := llama_bench(args.llama, mode, args.threads, args.reps)) is not None:
            line += f"   llama.cpp {LLAMA_FILES[mode]}: decode {theirs[1]:.2f} tok/s (ratio " \
                    f"{statistics.median(tps) / theirs[1]:.2f}), prompt {theirs[0]:.1f} tok/s"
        print(line)


if __name__ == "__main__":
    main()
