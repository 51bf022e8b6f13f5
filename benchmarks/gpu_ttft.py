"""Time to first token with a 448x448 image on a GPU: the vision tower with and without its Triton
kernels (kernels/triton_vision_ops.py), one engine each in one process (2B shapes, random weights).

Prints, for each: TTFT from the messages (median of `--reps` fresh images, the two engines taking
turns), the vision tower alone as LLM runs it (CUDA-synced, median), and whether the towers'
outputs agree.

    python -m benchmarks.gpu_ttft --tokenizer .cache/qwen_tokenizer [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu_check import build_checkpoint, fresh_image, image_messages, log
from qwen2vl import LLM, SamplingParams
from qwen2vl.backends.reference import TORCH_OPS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".cache/qwen_tokenizer")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--model", default="/tmp/qwen2vl-2b-random", help="checkpoint folder (built if missing)")
    ap.add_argument("--device", default="cuda", help="cpu runs the same code (a dry run of the script)")
    args = ap.parse_args()
    folder, dev = Path(args.model), args.device
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
    if not (folder / "config.json").is_file():
        build_checkpoint(folder, Path(args.tokenizer))
        torch.cuda.empty_cache()
    log(torch.cuda.get_device_name() if dev == "cuda" else dev)
    llms = {}
    llms["torch vision ops"] = LLM(str(folder), dtype="bfloat16", device=dev, kv_cache_gib=1.0)
    llms["torch vision ops"].model.visual.ops = TORCH_OPS  # the reference tower ops (backends/reference.py)
    llms["Triton vision ops"] = LLM(str(folder), dtype="bfloat16", device=dev, kv_cache_gib=1.0)
    one = SamplingParams(temperature=0, max_tokens=1)
    for llm in llms.values():
        llm.chat(image_messages(), one)  # warm-up: compiles, picks kernels
    ttft = {name: [] for name in llms}
    for rep in range(args.reps):
        for name, llm in llms.items():
            t = time.perf_counter()
            llm.chat(fresh_image(100 + rep), one)  # the same image for both: a fresh one per repetition
            ttft[name].append(time.perf_counter() - t)
    item = next(iter(llms.values())).prompt(fresh_image(1)).vision[0]
    pixels, grid = item.pixel_values.to(dev), torch.tensor([item.grid_thw])
    towers = {}
    for name, llm in llms.items():
        with torch.inference_mode():
            towers[name] = llm.model.visual(pixels.to(torch.bfloat16), grid)
            times = []
            for _ in range(10):
                sync()
                t = time.perf_counter()
                llm.model.visual(pixels.to(torch.bfloat16), grid)
                sync()
                times.append(time.perf_counter() - t)
        blocks = type(llm.model.visual.blocks[0].attn).__name__
        log(f"{name} ({blocks}): TTFT {statistics.median(ttft[name]) * 1e3:.1f} ms (runs "
            f"{[round(x * 1e3, 1) for x in ttft[name]]}); vision tower alone {statistics.median(times) * 1e3:.2f} ms")
    a, b = towers.values()
    log(f"towers: max abs difference {(a.float() - b.float()).abs().max().item():.3e} "
        f"(max |out| {a.float().abs().max().item():.3e}), {(a == b).float().mean().item():.4f} of values equal")


if __name__ == "__main__":
    main()
