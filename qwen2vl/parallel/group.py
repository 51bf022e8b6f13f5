"""Rank 0's side of tensor parallelism: start the other ranks, load its own shards, send every forward.

    tp = TensorParallel(folder, dtype, device, quantization, n)   # ranks 1..n-1 load while rank 0 does
    tp.model                 # rank 0's Qwen2VL: the engine drives it as it would a whole model
    tp.size_cache(cache)     # once the engine has sized its KV cache: the other ranks allocate theirs
    tp.close()               # ranks stop and are joined (also when tp is garbage-collected or the process exits)

One process per rank, one device each: cuda:i+rank for a model on cuda:i (NCCL), or the CPU (gloo;
the cores shared out, one torch thread per rank at least). A rank that dies is noticed by a watcher
thread (its process sentinel): the next step raises `WorkerDied`, and `on_death` callbacks (the
server's) run at once. One tensor-parallel model per process: torch.distributed has one default group.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import socket
import threading
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.parallel import step, worker
from qwen2vl.parallel.plan import check_tensor_parallel
from qwen2vl.parallel.shard import load_rank


class WorkerDied(RuntimeError):
    """A tensor-parallel rank's process exited: the model can't run any more."""


class TensorParallel:
    def __init__(self, folder, dtype, device, quantization: str | None, n: int):
        check_tensor_parallel(Qwen2VLConfig.from_pretrained(folder).text, n)  # before any process starts
        device = torch.device(device)
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed group: one tensor-parallel model "
                               "per process (close the other LLM first)")
        if device.type == "cuda":
            first = device.index or 0
            if first + n > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size {n} on cuda:{first} needs GPUs {first}..{first + n - 1}; "
                                 f"torch sees {torch.cuda.device_count()}")
            devices = [torch.device("cuda", first + r) for r in range(n)]
        elif device.type == "cpu":
            devices = [device] * n
        else:
            raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device.type}")
        threads = max(1, len(os.sched_getaffinity(0)) // n)
        address = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        self.dead: str | None = None
        self.on_death: list[Callable[[str], None]] = []
        self._closing = threading.Event()
        self._finalize = weakref.finalize(self, _stop, self.procs, self.conns, self._closing)
        for rank in range(1, n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker.main, daemon=True, name=f"qwen2vl-tp-rank{rank}",
                               args=(rank, n, folder, dtype, devices[rank], quantization, threads, address, theirs,
                                     os.getpid()))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        torch.set_num_threads(threads)
        try:
            self.model = load_rank(folder, dtype, devices[0], quantization, 0, n)
            self._wait_ready()
            worker.init_group(devices[0], address, 0, n)
        except BaseException:
            self.close()
            raise
        self.model.model.register_forward_pre_hook(self._send)
        # the thread holds a weak reference: a model nobody uses any more is collected, and its ranks stopped
        threading.Thread(target=_watch, args=(weakref.ref(self), [p.sentinel for p in self.procs], self._closing),
                         name="qwen2vl-tp-watch", daemon=True).start()

    def size_cache(self, cache) -> None:
        """The other ranks allocate their KV cache: as many blocks as rank 0's, their own heads."""
        for conn in self.conns:
            conn.send(("cache", cache.num_blocks, cache.block_size))

    def close(self) -> None:
        self._finalize()

    def failure(self, error: BaseException) -> str:
        """Why a step failed: a rank that died (given a moment to be seen dying), else `error`."""
        for proc in self.procs:
            proc.join(timeout=1)
        gone = [(r, p) for r, p in enumerate(self.procs, 1) if not p.is_alive()]
        if not gone:
            return f"a tensor-parallel step failed ({type(error).__name__}: {error}); the ranks are out of step"
        return "; ".join(f"tensor-parallel rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                         for r, p in gone) + ": the model can't run without it"

    def _send(self, _module, args) -> None:
        if self._closing.is_set():
            raise RuntimeError("this tensor-parallel model was closed (LLM.close()); its other ranks are gone")
        if self.dead is not None:
            raise WorkerDied(self.dead)
        step.send(self.conns, *args)

    def _wait_ready(self) -> None:
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), 1):
            multiprocessing.connection.wait([conn, proc.sentinel])
            try:
                message = conn.recv()
            except EOFError:
                proc.join()
                message = ("error", f"exited with code {proc.exitcode} while loading (its error is above)")
            if message[0] != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank}: {message[1]}")

    def _died(self) -> None:
        self.dead = self.failure(WorkerDied())
        for callback in self.on_death:
            callback(self.dead)


def _watch(ref: weakref.ref, sentinels: list, closing: threading.Event) -> None:
    multiprocessing.connection.wait(sentinels)
    tp = ref()
    if tp is not None and not closing.is_set():
        tp._died()


def _stop(procs, conns, closing: threading.Event) -> None:
    """Stop every rank and wait for it (terminate, then kill, the ones that don't stop)."""
    closing.set()
    for conn in conns:
        try:
            conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
