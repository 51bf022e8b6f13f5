"""The engine alone, greedy against sampled: what sampling costs per step at a given batch.

    python -m benchmarks.engine_sampling --model .cache/server_tiny_qwen2vl
    python -m benchmarks.engine_sampling --model DIR --batches 32 128 --tokens 32 --reps 5 --threads 1
    python -m benchmarks.engine_sampling --model DIR --batches 32 --profile sampled   # cProfile, top entries

`LLM.generate` over B text prompts of 16 distinct token ids (no prefix-cache hits), each generating
exactly --tokens tokens (ignore_eos), float32 on the CPU. Greedy is temperature 0; sampled is
temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.05, a seed per request. Within each
repetition the two run back to back, in alternating order (this machine's speed drifts), and the
ratio is taken per repetition; the median of those ratios is printed with all runs in brackets. On
a shared machine, --threads 1 gives steadier ratios: with 2 threads every parallel op waits for
the other core, which other jobs hold for milliseconds at a time.
On a tiny checkpoint the step is mostly the head and the sampler, which is the point: the model's
own time hides neither.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from qwen2vl import LLM, SamplingParams

SAMPLED = dict(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.05)


def params(kind: str, tokens: int, seed: int) -> SamplingParams:
    extra = SAMPLED if kind == "sampled" else dict(temperature=0.0)
    return SamplingParams(max_tokens=tokens, ignore_eos=True, seed=seed, **extra)


def run(llm: LLM, kind: str, batch: int, tokens: int, start: int) -> float:
    """Generated tokens/s of `batch` requests submitted together (prefill included)."""
    prompts = [[(1000 + (start + i) * 16 + j) % 150_000 for j in range(16)] for i in range(batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, [params(kind, tokens, start + i) for i in range(batch)])
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == tokens for o in outs)
    return batch * tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder, e.g. .cache/server_tiny_qwen2vl")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--profile", choices=["greedy", "sampled"], help="profile one run per batch instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32", device="cpu", max_num_seqs=max(args.batches), kv_cache_gib=0.5)
    print(f"model {args.model}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.tokens} tokens per request")
    run(llm, "greedy", 4, 4, 0)  # warm-up
    run(llm, "sampled", 4, 4, 0)
    start = 10_000  # fresh prompts every run: the prefix cache never helps
    for batch in args.batches:
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            tps = run(llm, args.profile, batch, args.tokens, start)
            prof.disable()
            start += batch
            print(f"\nbatch {batch}, {args.profile}: {tps:.1f} tok/s under cProfile; top entries by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            continue
        rates: dict[str, list[float]] = {"greedy": [], "sampled": []}
        for rep in range(args.reps):
            for kind in ("greedy", "sampled") if rep % 2 == 0 else ("sampled", "greedy"):
                rates[kind].append(run(llm, kind, batch, args.tokens, start))
                start += batch
        ratios = [s / g for s, g in zip(rates["sampled"], rates["greedy"])]
        print(f"\nbatch {batch}")
        for kind, r in rates.items():
            print(f"  {kind:8} {statistics.median(r):8.1f} tok/s   [{', '.join(f'{x:.1f}' for x in r)}]")
        print(f"  sampled/greedy {statistics.median(ratios):.2f}   [{', '.join(f'{x:.2f}' for x in ratios)}]")


if __name__ == "__main__":
    main()
