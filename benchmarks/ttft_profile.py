"""Where time to first token goes: one 448x448 image + question on the 2B shapes (random weights),
2 threads, at whatever tier the process is given, with or without `matmul="int8"`.

Wall time per part from timers wrapped around the functions (inclusive: the vision tower holds its
int8_mm calls and its attention), then torch.profiler's table of the ops' own time for one more
request (the C kernels show up inside the ops that call them: int8_mm under "int8_mm").

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python -m benchmarks.ttft_profile --matmul int8
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch

import qwen2vl.vision as vision
from benchmarks.cpu_tier import load_ours
from benchmarks.engine_cpu import engine_single
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl.backends.cpu import int8_mm
from qwen2vl.backends.cpu.backend import CpuBackend
from qwen2vl.text import TextModel

SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
STACK: list[str] = []


def timed(label: str, fn, tag_rows=False):
    """`fn` wrapped: its wall time added to SPENT[label, inside whichever timed part called it]."""
    def wrapper(*args, **kwargs):
        name = label
        if tag_rows:  # the decoder's calls: prefill (many rows) or decode
            name = f"{label} {'prefill' if args[1].shape[0] > int8_mm.SMALL_ROWS else 'decode'}"
        key = f"{STACK[0]} / {name}" if STACK else name
        STACK.append(name)
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            try:
                return fn(*args, **kwargs)
            finally:
                SPENT[key] += time.perf_counter() - start
                CALLS[key] += 1
                STACK.pop()
    return wrapper


def instrument() -> None:
    vision.VisionTower.forward = timed("vision tower", vision.VisionTower.forward)
    vision.block_diagonal_attention = timed("attention", vision.block_diagonal_attention)
    TextModel.forward = timed("decoder", TextModel.forward, tag_rows=True)
    CpuBackend.attention = timed("attention", CpuBackend.attention)
    int8_mm.int8_mm = timed("int8_mm", int8_mm.int8_mm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matmul", choices=["int8"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=30, help="rows of the profiler's table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    llm, _ = load_ours(folder, matmul=args.matmul)
    instrument()
    engine_single(llm, 7000, 2)  # warm-up
    SPENT.clear(), CALLS.clear()
    ttft = engine_single(llm, 7001, 2)[0]
    print(f"TTFT {ttft:.2f} s (matmul {args.matmul}, {args.threads} threads); inclusive wall time per part:")
    for key, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {key:40} {seconds:7.3f} s  {100 * seconds / ttft:5.1f}%  ({CALLS[key]} calls)")
    with contextlib.ExitStack() as stack:
        prof = stack.enter_context(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
        engine_single(llm, 7002, 2)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
