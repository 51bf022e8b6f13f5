"""The error of `matmul="int8"` (the vision tower and prefill in int8: weights per output channel,
activations per token) on the Qwen2-VL-2B shapes (random weights), against our float32 model.

For a few 448x448 images + question (benchmarks/engine_cpu.py's prompt), each model computes the
prompt's logits in one prefill, as LLM loads it at this tier; compared with float32's:
- vision: relative error (Frobenius) of the tower's output;
- first token: relative error of the last position's logits, and whether its argmax (the first
  generated token) is float32's;
- every prompt position: relative error, top-1 agreement.
bf16 (the default policy here) is printed as the yardstick. Random weights put many logits near a
tie, so agreement is a pessimistic floor for real checkpoints; the demo model's accuracy table
(`qwen2vl eval demo --matmul int8`) is the check on trained weights.

    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.matmul_int8_error
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.engine_cpu import conversation
from benchmarks.random_checkpoint import random_checkpoint
from qwen2vl import LLM
from qwen2vl.backends.cpu import isa

RUNS = [("float32", "float32", None), ("bfloat16", "bfloat16", None), ("bf16, matmul int8", "bfloat16", "int8")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def outputs(folder: str, dtype: str, matmul: str | None, seeds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(vision output, prompt logits) per image, float32."""
    llm = LLM(folder, dtype=dtype, device="cpu", kv_cache_gib=0.2, matmul=matmul)
    out = []
    with torch.inference_mode():
        for seed in seeds:
            inputs = llm.processor(conversation(seed), add_generation_prompt=True)
            vision = llm.model.visual(inputs["pixel_values"], inputs["image_grid_thw"])
            logits = llm.model.logits(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                      image_grid_thw=inputs["image_grid_thw"])
            out.append((vision.float(), logits.float()))
    del llm
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    folder = str(random_checkpoint("2b", tokenizer_dir=qwen_tokenizer_dir()))
    seeds = list(range(3000, 3000 + args.images))
    print(f"tier {isa.current().tier}; {args.images} images (448x448) + question; against our float32 model")
    ref = None
    print(f"\n{'':20}{'vision rel':>11}{'1st-token rel':>15}{'1st token same':>16}{'all rel':>9}{'all top-1':>11}")
    for name, dtype, matmul in RUNS:
        got = outputs(folder, dtype, matmul, seeds)
        ref = ref or got
        vision = [rel(v, rv) for (v, _), (rv, _) in zip(got, ref)]
        first = [rel(lg[-1], rl[-1]) for (_, lg), (_, rl) in zip(got, ref)]
        same = sum(int(lg[-1].argmax() == rl[-1].argmax()) for (_, lg), (_, rl) in zip(got, ref))
        every = [rel(lg, rl) for (_, lg), (_, rl) in zip(got, ref)]
        top1 = torch.cat([lg.argmax(-1) == rl.argmax(-1) for (_, lg), (_, rl) in zip(got, ref)]).float().mean()
        mean = lambda xs: sum(xs) / len(xs)
        print(f"{name:20}{mean(vision):11.4f}{mean(first):15.4f}{f'{same}/{len(seeds)}':>16}{mean(every):9.4f}"
              f"{top1.item():11.1%}")


if __name__ == "__main__":
    main()
