"""What tensor parallelism's all-reduces cost per decode step at the Qwen2-VL-2B shapes (gloo, 2 CPU processes).

A TP=2 decode step all-reduces [B, 1536] bf16 twice per layer (after o_proj and down_proj), 56
times over the 2B's 28 layers. Each of the 2 processes (1 torch thread each) alternates, round by
round, two measurements in the same process:
- comm: the step's 56 all-reduces of [B, 1536] bf16, back to back;
- compute: the rank's shard of the decoder's linears (q/k/v 6+1+1 heads, o, gate/up/down over half the
  MLP width) on the kernels the engine uses (FastLinear), timed over LAYERS_TIMED layers of distinct
  cold weights and scaled to 28.
Printed (rank 0, medians over rounds): all-reduce latency per call (and in the fastest round), per
step, and as a share of the step (comm / (comm + compute)). Both processes share this VM's 2 cores
with other work, which bounds and perturbs every figure here: on a machine with a core per rank and
idle neighbours the compute halves relative to one process and the all-reduce is the price of that.

    python -m benchmarks.tp_allreduce [--rounds 15] [--batch 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from qwen2vl.backends.cpu.linear import FastLinear

D, I, HEAD_DIM, HEADS, KV_HEADS, LAYERS = 1536, 8960, 128, 12, 2, 28
LAYERS_TIMED = 4  # distinct weights (4 x 47 MB a rank): past the caches, like a real step, in less memory
N = 2


def shard_linears() -> list[list[nn.Module]]:
    """One rank's linears of LAYERS_TIMED layers: (out, in) as plan.py splits them, in the engine's kernels."""
    q, kv = HEADS // N * HEAD_DIM, max(KV_HEADS // N, 1) * HEAD_DIM
    shapes = [(q + 2 * kv, D), (D, q), (I // N, D), (I // N, D), (D, I // N)]  # qkv, o, gate, up, down
    layers = []
    for _ in range(LAYERS_TIMED):
        layer = []
        for out, inp in shapes:
            lin = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16)
            layer.append(FastLinear.from_linear(lin, huge_pages=False))
        layers.append(layer)
    return layers


def run(rank: int, port: int, rounds: int, batches: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N)
    layers = shard_linears()
    for b in batches:
        x = torch.randn(b, D, dtype=torch.bfloat16)
        h = {"qkv": x, "o": torch.randn(b, HEADS // N * HEAD_DIM, dtype=torch.bfloat16),
             "down": torch.randn(b, I // N, dtype=torch.bfloat16)}
        comm, compute = [], []
        with torch.inference_mode():
            for _ in range(rounds + 1):  # the first round warms up
                dist.barrier()
                t = time.perf_counter()
                for _ in range(2 * LAYERS):
                    dist.all_reduce(x.clone())
                comm.append(time.perf_counter() - t)
                dist.barrier()
                t = time.perf_counter()
                for qkv, o, gate, up, down in layers:
                    qkv(h["qkv"]), o(h["o"]), gate(h["qkv"]), up(h["qkv"]), down(h["down"])
                compute.append((time.perf_counter() - t) * LAYERS / LAYERS_TIMED)
        c, m = statistics.median(comm[1:]), statistics.median(compute[1:])
        if rank == 0:  # the fastest round too: the closest this shared VM comes to an idle one
            print(f"batch {b:3d}: all-reduce {c / (2 * LAYERS) * 1e6:7.1f} us/call (fastest round "
                  f"{min(comm[1:]) / (2 * LAYERS) * 1e6:6.1f}), {c * 1e3:6.2f} ms/step; rank's linears "
                  f"{m * 1e3:6.2f} ms/step; all-reduce share {c / (c + m):5.1%}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", default="1,8,32")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"gloo, {N} processes x 1 thread, bf16 [B, {D}], {2 * LAYERS} all-reduces per decode step "
          f"({LAYERS} layers); {os.cpu_count()} CPUs shared with other work: figures are bounded by that")
    mp.spawn(run, args=(port, args.rounds, [int(b) for b in args.batch.split(",")]), nprocs=N)


if __name__ == "__main__":
    main()
