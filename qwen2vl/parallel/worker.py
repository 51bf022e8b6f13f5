"""Ranks 1..N-1: a process that loads its shards, then runs every decoder forward rank 0 announces.

Started by rank 0 (group.py) with torch.multiprocessing's spawn. It talks to rank 0 through a pipe
(load errors, "ready", the cache size, each forward's description, "stop") and through the
process group (the forward's tensors and the all-reduces). It never outlives rank 0: a closed pipe
(rank 0 gone) ends the loop, a collective with a dead peer raises, and a thread exits the process
when its parent changes (rank 0 killed while this rank computes).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from qwen2vl.engine.kv_cache import KVCache
from qwen2vl.parallel import step
from qwen2vl.parallel.shard import load_rank

# longest a collective waits for a peer: a whole layer's compute at most, so this only bounds a hang
TIMEOUT = timedelta(minutes=10)


def init_group(device: torch.device, address: str, rank: int, n: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank,
                            world_size=n, timeout=TIMEOUT)


def main(rank: int, n: int, folder, dtype, device: torch.device, quantization, threads: int, address: str,
         conn, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        model = load_rank(folder, dtype, device, quantization, rank, n)
    except Exception as e:  # rank 0 raises it: the user sees why this rank couldn't load
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    init_group(device, address, rank, n)
    cache = None
    with torch.inference_mode():
        while True:
            try:
                message = conn.recv()
            except EOFError:  # rank 0 is gone, and the group's store with it: tearing the group down would
                os._exit(1)  # wait on it (measured ~14 s), so leave at once
            if message[0] == "stop":
                break
            if message[0] == "cache":  # the engine sized it on rank 0; each rank holds its own KV heads
                cache = KVCache(model.config.text, *message[1:], model.dtype, model.device)
                continue
            x, positions, attend = step.receive(message, model.device, model.backend, cache)
            model.model(x, positions, attend)
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
