"""What `matmul="int8"` costs at load: `LLM(folder, dtype="bfloat16")` without the knob, with it
(weights quantized by pack.c's quantize_int8 straight into int8_mm's layout), and with it through
the torch code that did it before (backends/quant.py's quantize_int8_rows + pack_int8), in turn in
one process, `--reps` rounds; plus that quantization alone on one decoder layer's and one vision
block's weights, C against torch, alternating.

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.load_int8 --reps 3
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.cpu_tier import load_ours, median
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl.backends.cpu import packing
from qwen2vl.backends.quant import quantize_int8_rows

C_QUANTIZE = packing.quantize_int8


def torch_quantize(w: torch.Tensor, huge_pages: bool = True):
    q, scales = quantize_int8_rows(w)
    return packing.pack_int8(packing.pad_rows(q, packing.ROWS), huge_pages), packing.pad_rows(scales, packing.ROWS)


# variant: (matmul, the quantizer Int8Linear.from_linear calls)
VARIANTS = {"no knob": (None, C_QUANTIZE), "int8, C": ("int8", C_QUANTIZE), "int8, torch": ("int8", torch_quantize)}
# the 2B's linears [out, in]: a decoder layer's (fused qkv, o, gate, up, down) and a vision block's
SHAPES = {"decoder layer": [(2048, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960)],
          "vision block": [(3840, 1280), (1280, 1280), (5120, 1280), (1280, 5120)]}


def quantize_alone(reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for name, shapes in SHAPES.items():
        ws = [torch.randn(n, k, generator=g).bfloat16() for n, k in shapes]
        times = {"C": [], "torch": []}
        for _ in range(reps):
            for label, fn in (("C", C_QUANTIZE), ("torch", torch_quantize)):
                start = time.perf_counter()
                for w in ws:
                    fn(w, False)
                times[label].append(time.perf_counter() - start)
        ratios = [t / c for c, t in zip(times["C"], times["torch"])]
        weights = sum(n * k for n, k in shapes)
        print(f"quantize {name} ({weights / 1e6:.1f} M weights): C {median(times['C'])} s, torch "
              f"{median(times['torch'])} s, torch / C pair by pair {statistics.median(ratios):.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir())
    quantize_alone(args.reps * 3)
    loads = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, (matmul, quantizer) in VARIANTS.items():
            packing.quantize_int8 = quantizer
            try:
                llm, seconds = load_ours(folder, matmul=matmul)
            finally:
                packing.quantize_int8 = C_QUANTIZE
            loads[name].append(seconds)
            del llm
            gc.collect()
    for name, ts in loads.items():
        print(f"load {name:12} median {median(ts)} s")


if __name__ == "__main__":
    main()
