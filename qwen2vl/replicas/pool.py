"""`ReplicaPool`: the engine the FastAPI app drives when the model runs as N Ray Serve replicas.

It answers what the app asks of an AsyncLLM (`generate`, `embed`, `stats`, `served`, `stopped`,
`shutdown`), so the app keeps everything it does (auth, limits, validation, tools, structured
output, the web page, metrics) and only the engine moved. Each generation goes to one replica
(routing.py) and streams its deltas back through a Ray Serve streaming handle.

A replica that dies (or can't be reached) mid-request costs no request: the request is re-run from
its prompt on another replica. Deltas the client already has are not sent twice: the re-run's
tokens are checked against them and only what comes after is passed on, so the client still gets
one whole answer. That holds for sampled requests too, because the pool pins a seed on every request
that brings none (the engine's sampling noise is a hash of seed and step, sampler.py), so a re-run
draws the same tokens. A re-run that disagrees with what was sent (it can't, barring numerics that
differ between machines) ends the stream with an error rather than a spliced answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import uuid
from dataclasses import dataclass, fields, replace

from qwen2vl.engine.async_engine import EngineStopped
from qwen2vl.engine.outputs import Delta, EngineStats
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence
from qwen2vl.engine.served import ServedModel
from qwen2vl.replicas.routing import RouteKeys, Router

log = logging.getLogger("qwen2vl.replicas")

PROBE_S = 0.5  # how often replica stats are read (and down replicas probed)


@dataclass
class ReplicaHealth:
    total: int
    up: int  # answered their last stats read
    retries: int


class ReplicaPool:
    def __init__(self, handles: list, served: ServedModel, block_size: int, replica_lost: tuple, *,
                 max_imbalance: int = 4):
        """`handles`: one Ray Serve DeploymentHandle per replica; `replica_lost`: the exception types
        that mean a replica is gone (Ray's, passed in so this file needs no Ray)."""
        self.handles = handles
        self.served = served
        self.block_size = block_size
        self.replica_lost = replica_lost
        self.router = Router(len(handles), max_imbalance)
        self.retries = 0  # requests re-run on another replica
        self._stats: list[EngineStats | None] = [None] * len(handles)
        self._stopped = False
        # AsyncLLM's "failed for good" pair, which the server watches: a pool never sets it, since it
        # routes around a lost replica and Serve restarts it
        self.failure: str | None = None
        self.failed = threading.Event()
        self._probe: asyncio.Task | None = None
        self.started_ray = False  # launch.py started Ray for this pool (and shuts it down with it)
        self.apps: list[str] = []  # the replicas' Serve application names (launch.py)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def health(self) -> ReplicaHealth:
        return ReplicaHealth(len(self.handles), len(self.handles) - len(self.router.down), self.retries)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return SamplingParams(**{**self.served.defaults, **overrides})

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       lora: str | None = None):
        """Deltas of one request, as AsyncLLM.generate gives them; `prompt` is a Prompt."""
        if self._stopped:
            raise EngineStopped()
        self._start_probe()
        if lora is not None and lora not in self.served.lora_names:
            raise ValueError(f"no LoRA adapter named {lora!r}; loaded: {self.served.lora_names or 'none'}")
        params = params or self.default_sampling_params()
        if params.seed is None and not params.greedy:  # so that a re-run draws the same tokens
            params = replace(params, seed=random.getrandbits(63))
        request_id = request_id or uuid.uuid4().hex
        keys = self.route_keys(prompt, lora)
        sent: dict[int, Delta] = {}  # per completion: every token and all text the caller has had
        failed: set[int] = set()
        while True:
            r = self.router.pick(keys, failed)
            self.router.record(r, keys)
            self.router.load[r] += 1
            stream = self.handles[r].options(stream=True).generate.remote(prompt, params, request_id, lora)
            got: dict[int, Delta] = {}  # per completion: what this attempt produced
            finished = False
            try:
                async for delta in stream:
                    new = _unsent(delta, got, sent)
                    if new is not None:
                        yield new
                    finished = delta.usage is not None
                return
            except self.replica_lost as e:
                failed.add(r)
                self._mark_down(r)
                self.retries += 1
                if len(failed) == len(self.handles):
                    raise EngineStopped() from e
                log.warning("replica %d lost during request %s (%s); re-running it on another replica", r,
                            request_id, type(e).__name__)
            finally:
                self.router.load[r] -= 1
                if not finished:
                    stream.cancel()  # the caller left (or the replica died): stop the work there

    async def embed(self, prompts) -> object:
        """[B, D] float32 pooled hidden states from the least loaded replica (retried on another)."""
        if self._stopped:
            raise EngineStopped()
        self._start_probe()
        failed: set[int] = set()
        while True:
            r = self.router.pick(RouteKeys([]), failed)
            self.router.load[r] += 1
            try:
                return await self.handles[r].embed.remote(prompts)
            except self.replica_lost as e:
                failed.add(r)
                self._mark_down(r)
                if len(failed) == len(self.handles):
                    raise EngineStopped() from e
            finally:
                self.router.load[r] -= 1

    def route_keys(self, prompt, lora: str | None) -> RouteKeys:
        """The engine's own prefix-cache keys for this prompt (the chain starts from the LoRA slot)."""
        slot = self.served.lora_names.index(lora) + 1 if lora is not None else 0
        seq = Sequence("route", prompt, SamplingParams(), 0, 0, slot)
        return RouteKeys(seq.hashes(self.block_size), [v.content_hash for v in prompt.vision])

    def stats(self) -> EngineStats:
        """The replicas' stats summed (the last known of each), refreshed every PROBE_S seconds."""
        self._start_probe()
        known = [s for s in self._stats if s is not None]
        if not known:
            return EngineStats(0, 0, 0, 0, self.block_size, 0, 0, 0, 0, 0)
        total = {f.name: sum(getattr(s, f.name) for s in known) for f in fields(EngineStats)}
        return EngineStats(**{**total, "block_size": self.block_size})

    def shutdown(self) -> None:
        self._stopped = True
        if self._probe is not None:
            self._probe.cancel()

    # -- replica health -----------------------------------------------------------------------

    def _mark_down(self, r: int) -> None:
        if r not in self.router.down:
            self.router.down.add(r)
            self.router.forget(r)  # Ray Serve restarts it with empty caches

    def _start_probe(self) -> None:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while not self._stopped:
            await asyncio.gather(*(self._read_stats(r) for r in range(len(self.handles))))
            await asyncio.sleep(PROBE_S)

    async def _read_stats(self, r: int) -> None:
        try:
            self._stats[r] = await asyncio.wait_for(self.handles[r].stats.remote(), timeout=5 * PROBE_S)
        except Exception:  # dead, restarting or slow: routed around until it answers again
            self._mark_down(r)
        else:
            self.router.down.discard(r)


def _unsent(delta: Delta, got: dict[int, Delta], sent: dict[int, Delta]) -> Delta | None:
    """The part of `delta` the caller has not had yet, or None. `got[i]`: this attempt's completion i
    so far; `sent[i]`: what the caller already has of it (from earlier attempts and this one)."""
    i = delta.index
    mine = got.setdefault(i, Delta(delta.request_id, i, "", [], logprobs=[]))
    before = len(mine.token_ids)
    mine.token_ids += delta.token_ids
    mine.text += delta.text
    mine.logprobs += delta.logprobs or []
    have = sent.setdefault(i, Delta(delta.request_id, i, "", [], logprobs=[]))
    if have.finished:  # this completion ended before the replica was lost: the caller has all of it
        return None
    overlap = min(len(mine.token_ids), len(have.token_ids))
    if mine.token_ids[:overlap] != have.token_ids[:overlap] or not (
            mine.text.startswith(have.text) or have.text.startswith(mine.text)):
        raise RuntimeError(f"request {delta.request_id}: the re-run on another replica produced other tokens than "
                           "those already sent; the answer can't be completed")
    start = max(0, len(have.token_ids) - before)
    new = Delta(delta.request_id, i, mine.text[len(have.text):], delta.token_ids[start:], delta.finish_reason,
                None if delta.logprobs is None else delta.logprobs[start:], delta.usage)
    if not (new.text or new.token_ids or new.finished or new.usage):
        return None
    have.token_ids += new.token_ids
    have.text += new.text
    have.finish_reason = new.finish_reason
    return new
