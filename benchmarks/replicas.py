"""Throughput of 2 engine replicas on Ray Serve against 1, on this machine.

One local Ray, three replicas deployed once (one torch thread each): the "1 replica" pool drives
replica 0, the "2 replicas" pool drives replicas 1 and 2, and rounds alternate between them in this
process (the VM's speed drifts). Each round submits the same `--requests` distinct prompts at once
through ReplicaPool.generate (the path the server takes, minus HTTP) and counts generated tokens
(ignore_eos: every request makes exactly --max-tokens). A third pool, one replica with two torch
threads, shows what the same two cores give without replicas.

On a 2-core machine the two replicas are bounded by those 2 cores (and by whatever else runs):
the ratio says how well replicas use cores, not what N GPUs would give.

    python -m benchmarks.replicas                          # the tests' tiny checkpoint
    python -m benchmarks.replicas --model 2b --layers 2    # real Qwen2-VL-2B widths, 2 layers (random)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.replicas.launch import start_replicas, stop_replicas
from qwen2vl.replicas.pool import ReplicaPool


def model_folder(args) -> str:
    if args.model == "tiny":
        from tests.helpers.checkpoints import tiny_checkpoint

        return str(tiny_checkpoint())
    from benchmarks.random_checkpoint import CONFIGS, random_checkpoint
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    if args.model not in CONFIGS:
        return args.model
    # the engine needs a tokenizer; random checkpoints get the real Qwen one
    return str(random_checkpoint(args.model, tokenizer_dir=qwen_tokenizer_dir(), layers=args.layers))


async def one_round(pool: ReplicaPool, prompts: list[Prompt], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def run(prompt):
        return sum([len(d.token_ids) async for d in pool.generate(prompt, params)])

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(run(p) for p in prompts)))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny', a random checkpoint name (2b, 7b, ...) or a folder")
    parser.add_argument("--layers", type=int, help="with a random checkpoint: this many layers")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-cpus", type=float, default=2, help="CPUs the local Ray may use")
    args = parser.parse_args()

    folder = model_folder(args)
    load_before = os.getloadavg()[0]
    engine = {"dtype": "bfloat16" if args.model != "tiny" else "float32", "device": "cpu", "kv_cache_gib": 0.5,
              "max_model_len": 2048}
    one_thread = start_replicas(folder, engine, 3, num_cpus=args.num_cpus, replica_cpus=0.5, torch_threads=1,
                                name="bench-1t")
    two_threads = start_replicas(folder, engine, 1, replica_cpus=0.5, torch_threads=2, name="bench-2t")
    lost = one_thread.replica_lost
    pools = {"1 replica, 1 thread": ReplicaPool(one_thread.handles[:1], one_thread.served, one_thread.block_size, lost),
             "2 replicas, 1 thread each": ReplicaPool(one_thread.handles[1:], one_thread.served,
                                                      one_thread.block_size, lost),
             "1 replica, 2 threads": two_threads}
    processor, config = one_thread.served.processor, one_thread.served.config
    prompts = [Prompt.from_inputs(processor([{"role": "user", "content": f"request {i}: count from {i} to {i + 40}"}],
                                            True), config) for i in range(args.requests)]
    rates: dict[str, list[float]] = {name: [] for name in pools}

    async def measure():
        for pool in pools.values():  # warm-up: first steps, allocator, Ray's connections
            await one_round(pool, prompts[:2], 4)
        for r in range(args.rounds):
            for name, pool in pools.items():
                seconds, tokens = await one_round(pool, prompts, args.max_tokens)
                rates[name].append(tokens / seconds)
                print(f"round {r}: {name:26s} {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:7.1f} tok/s",
                      flush=True)

    try:
        asyncio.run(measure())
    finally:
        stop_replicas(two_threads)
        stop_replicas(one_thread)
    base = statistics.median(rates["1 replica, 1 thread"])
    print(f"\nload average (1 min) of this machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} cores): other jobs share the cores")
    print(f"model {args.model}{f' ({args.layers} layers)' if args.layers else ''}, {args.requests} requests x "
          f"{args.max_tokens} tokens, {args.rounds} rounds, medians:")
    first = rates["1 replica, 1 thread"]
    for name, values in rates.items():
        per_round = statistics.median(v / b for v, b in zip(values, first))  # each round against its own baseline
        print(f"  {name:26s} {statistics.median(values):7.1f} tok/s  x{statistics.median(values) / base:.2f} "
              f"(median of per-round ratios x{per_round:.2f})")


if __name__ == "__main__":
    main()
