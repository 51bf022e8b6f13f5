"""The engine alone, greedy against sampled: what sampling costs per step at a given batch.

    python -m benchmarks.engine_sampling --model .cache/server_tiny_qwen2vl
    python -m benchmarks.engine_sampling --model DIR --batches 32 128 --tokens 32 --reps 5 --threads 1
    python -m benchmarks.engine_sampling --model DIR --batches 32 --profile sampled   # cProfile, top entries
    python -m benchmarks.engine_sampling --model DIR --batches 32 128 --threads 1 --profile-ops sampled  # torch ops

`LLM.generate` over B text prompts of 16 distinct token ids (no prefix-cache hits), each generating
exactly --tokens tokens (ignore_eos), float32 on the CPU. Greedy is temperature 0; sampled is
temperature 0.7, top-p 0.9, top-k 50, repetition penalty 1.05, a seed per request. Within each
repetition the two run back to back, in alternating order (this machine's speed drifts), and the
ratio is taken per repetition; the median of those ratios is printed with all runs in brackets. On
a shared machine, --threads 1 gives steadier ratios: with 2 threads every parallel op waits for
the other core, which other jobs hold for milliseconds at a time. The sampler's share is the CPU
time (this thread's, so other jobs on the machine do not count) spent in the sampler over the CPU
time of the whole run, and tokens per CPU second gives a second sampled/greedy ratio: the steadiest
figures on a busy machine.
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


class TimedSampler:
    """The runner's sampler, its CPU time summed."""

    def __init__(self, sample):
        self.sample, self.cpu = sample, 0.0

    def __call__(self, logits, seqs):
        t0 = time.thread_time()
        out = self.sample(logits, seqs)
        self.cpu += time.thread_time() - t0
        return out


def run(llm: LLM, kind: str, batch: int, tokens: int, start: int) -> tuple[float, float, float]:
    """Generated tokens/s of `batch` requests submitted together (prefill included), the sampler's
    share of the run's CPU time, and generated tokens per CPU second."""
    prompts = [[(1000 + (start + i) * 16 + j) % 150_000 for j in range(16)] for i in range(batch)]
    runner = llm.engine.runner
    if not isinstance(runner.sample, TimedSampler):
        runner.sample = TimedSampler(runner.sample)
    runner.sample.cpu = 0.0
    t0, cpu0 = time.perf_counter(), time.thread_time()
    outs = llm.generate(prompts, [params(kind, tokens, start + i) for i in range(batch)])
    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    assert all(len(o.token_ids) == tokens for o in outs)
    return batch * tokens / elapsed, runner.sample.cpu / cpu, batch * tokens / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder, e.g. .cache/server_tiny_qwen2vl")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--profile", choices=["greedy", "sampled"], help="profile one run per batch instead")
    ap.add_argument("--profile-ops", choices=["greedy", "sampled"],
                    help="torch.profiler over one run per batch instead: torch ops by own CPU time")
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
        if args.profile_ops:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                tps = run(llm, args.profile_ops, batch, args.tokens, start)[0]
            start += batch
            print(f"\nbatch {batch}, {args.profile_ops}: {tps:.1f} tok/s under torch.profiler; ops by own CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            continue
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            tps = run(llm, args.profile, batch, args.tokens, start)[0]
            prof.disable()
            start += batch
            print(f"\nbatch {batch}, {args.profile}: {tps:.1f} tok/s under cProfile; top entries by own time")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            continue
        rates: dict[str, list[float]] = {"greedy": [], "sampled": []}
        shares: dict[str, list[float]] = {"greedy": [], "sampled": []}
        per_cpu: dict[str, list[float]] = {"greedy": [], "sampled": []}
        for rep in range(args.reps):
            for kind in ("greedy", "sampled") if rep % 2 == 0 else ("sampled", "greedy"):
                tps, share, tpc = run(llm, kind, batch, args.tokens, start)
                rates[kind].append(tps)
                shares[kind].append(share)
                per_cpu[kind].append(tpc)
                start += batch
        ratios = [s / g for s, g in zip(rates["sampled"], rates["greedy"])]
        print(f"\nbatch {batch}")
        for kind, r in rates.items():
            print(f"  {kind:8} {statistics.median(r):8.1f} tok/s   [{', '.join(f'{x:.1f}' for x in r)}]   "
                  f"sampler {statistics.median(shares[kind]):.1%} of the CPU time")
        print(f"  sampled/greedy {statistics.median(ratios):.2f}   [{', '.join(f'{x:.2f}' for x in ratios)}]")
        cpu_ratios = [s / g for s, g in zip(per_cpu["sampled"], per_cpu["greedy"])]
        print(f"  sampled/greedy by tokens per CPU second {statistics.median(cpu_ratios):.2f}   "
              f"[{', '.join(f'{x:.2f}' for x in cpu_ratios)}]")


if __name__ == "__main__":
    main()
