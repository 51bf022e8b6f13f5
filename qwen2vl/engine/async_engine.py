"""`AsyncLLM`: the engine for asyncio callers (the server).

One background thread owns the engine and runs its step loop; callers talk to it through a command
queue (add, abort) and each request gets an asyncio queue of increments, filled thread-safely.

    async for delta in engine.generate(messages, params, request_id="abc"):
        send(delta.text)           # delta.token_ids, delta.finish_reason, delta.usage (on the last)

Leaving the loop early (client gone, task cancelled) aborts the request, and the engine thread
frees its KV blocks before its next step. A step's increments reach each event loop in one wake-up,
and a caller that fell behind gets what piled up as one merged increment per completion, so a slow
stream costs one event per read, not one per token. Picture decoding and resizing run in a worker thread,
not on the event loop and not in the engine thread. Embeddings (`await engine.embed(prompts)`) run in
the engine thread between two steps: prefill only, no cache blocks (engine/embed.py).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from qwen2vl.engine.llm import LLM
from qwen2vl.engine.outputs import Delta, EngineStats
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.served import ServedModel


class EngineStopped(RuntimeError):
    """The engine was shut down, or failed for good: nothing more is served (the server answers 503)."""

    def __init__(self, failure: str | None = None):
        super().__init__(failure or "the engine is shut down")
        self.failure = failure  # why the engine failed for good, or None: it was shut down


class AsyncLLM:
    def __init__(self, model, **llm_args):
        """Same arguments as `LLM`."""
        self._start(LLM(model, **llm_args))

    @classmethod
    def from_llm(cls, llm: LLM) -> AsyncLLM:
        """Drive an already loaded LLM (do not call its synchronous methods afterwards)."""
        self = cls.__new__(cls)
        self._start(llm)
        return self

    def _start(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.processor = llm.processor
        self.served = ServedModel.from_llm(llm)  # what the server reads (a replica pool has one too)
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stats = self.engine.stats()
        self._stopped = False
        self.failure: str | None = None  # why the engine can't serve any more (a tensor-parallel rank died)
        self.failed = threading.Event()  # set with failure: the server stops (server/cli.py)
        if llm.tp is not None:
            llm.tp.on_death.append(self.fail)
        self._thread = threading.Thread(target=self._loop, name="qwen2vl-engine", daemon=True)
        self._thread.start()

    def default_sampling_params(self, **overrides) -> SamplingParams:
        return self.llm.default_sampling_params(**overrides)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       lora: str | None = None, **processor_args) -> AsyncIterator[Delta]:
        """Increments of one request. `prompt`: messages (Qwen or OpenAI form) or a `Prompt`; `lora`: the
        name of a loaded LoRA adapter (None: LLM's default)."""
        if self._stopped:
            raise self._stopped_error()
        slot = self.llm.lora_slot(lora)
        if not isinstance(prompt, Prompt):
            prompt = await asyncio.to_thread(self.llm.prompt, prompt, **processor_args)
        params = params or self.default_sampling_params()
        self.engine.validate(prompt, params)  # read-only: raises here, at the caller, for a bad request
        request_id = request_id or f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", request_id, prompt, params, slot, asyncio.get_running_loop(), stream))
        finished = False
        try:
            while not finished:
                items = [await stream.get()]
                while not stream.empty():  # behind: take everything that piled up
                    items.append(stream.get_nowait())
                error = next((x for x in items if isinstance(x, BaseException)), None)
                if error is not None:
                    finished = True
                    raise error
                for delta in merge(items):
                    finished = delta.usage is not None  # the request's last increment carries its usage
                    yield delta
        finally:
            if not finished:
                self.abort(request_id)

    async def embed(self, prompts: list[Prompt]) -> torch.Tensor:
        """[B, D] float32 pooled hidden states (LLM.pooling's mode), from the engine thread; a prompt
        the engine can't embed raises its ValueError here."""
        if self._stopped:
            raise self._stopped_error()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("embed", prompts, loop, future))
        return await future

    def abort(self, request_id: str) -> None:
        """End a request; its blocks are freed before the engine's next step."""
        self._commands.put(("abort", request_id))

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stats(self) -> EngineStats:
        """Queue length, running sequences, KV usage, cache hit counts: refreshed after every step."""
        return self._stats

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
        self.llm.close()

    def fail(self, reason: str) -> None:
        """Stop for good (any thread): callers get 503 with `reason`, and `failed` is set."""
        self.failure = self.failure or reason
        self._stopped = True
        self.failed.set()
        self._commands.put(("stop",))

    def _stopped_error(self) -> EngineStopped:
        return EngineStopped(self.failure)

    # -- the engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                # idle: sleep until a command arrives; busy: take what is there and step
                commands = [self._commands.get()] if not self.engine.has_work() else []
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for i, cmd in enumerate(commands):
                    if cmd[0] == "stop":
                        self._fail_all(self._stopped_error())
                        for late in commands[i + 1:]:  # queued behind the stop: answer, don't hang
                            if late[0] in ("add", "embed"):
                                _answer(late[-2], late[-1], error=self._stopped_error())
                        return
                    self._run_command(cmd)
                if self.engine.has_work():
                    self._deliver(self.engine.step())
            except Exception as e:  # a failed step must not hang every client: fail them, keep serving
                if self.llm.tp is not None:  # ranks out of step (or one dead): nothing more can run
                    self.fail(self.llm.tp.failure(e))
                    self._fail_all(self._stopped_error())
                    return
                self._fail_all(e)
            self._stats = self.engine.stats()

    def _run_command(self, cmd) -> None:
        if cmd[0] == "add":
            _, request_id, prompt, params, slot, loop, stream = cmd
            try:
                self.engine.add_request(request_id, prompt, params, lora=slot)
            except ValueError as e:
                loop.call_soon_threadsafe(stream.put_nowait, e)
                return
            self._streams[request_id] = (loop, stream)
        elif cmd[0] == "embed":
            _, prompts, loop, future = cmd
            try:
                vectors = self.engine.embed(prompts, self.llm.pooling.mode)
            except Exception as e:  # a bad request (ValueError) or a real fault: the caller's to report
                _answer(loop, future, error=e)
                return
            _answer(loop, future, vectors)
        elif cmd[0] == "abort":
            self._deliver(self.engine.abort(cmd[1]))

    def _deliver(self, deltas: list[Delta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for delta in deltas:
            target = self._streams.get(delta.request_id)
            if target is None:
                continue
            loop, stream = target
            if delta.usage is not None:
                del self._streams[delta.request_id]
            by_loop.setdefault(loop, []).append((stream, delta))
        for loop, items in by_loop.items():  # one wake-up per event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for _, delta in items:
                    self.engine.abort(delta.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, (loop, stream) in list(self._streams.items()):
            self.engine.abort(request_id)
            try:
                loop.call_soon_threadsafe(stream.put_nowait, error)
            except RuntimeError:
                pass
        self._streams.clear()


def _answer(loop: asyncio.AbstractEventLoop, target, value=None, error: BaseException | None = None) -> None:
    """Settle a future, or put an error on a stream, from the engine thread (if anyone still listens)."""

    def settle():
        if isinstance(target, asyncio.Queue):
            target.put_nowait(error)
        elif not target.done():
            target.set_exception(error) if error is not None else target.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed
        pass


def _put_all(items: list) -> None:
    for stream, delta in items:
        stream.put_nowait(delta)


def merge(deltas: list[Delta]) -> list[Delta]:
    """Consecutive increments of one completion as one (text, ids and logprobs joined; the last
    one's finish reason and usage)."""
    out: list[Delta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is None or last.index != d.index or last.finished:
            out.append(replace(d, token_ids=list(d.token_ids),
                               logprobs=None if d.logprobs is None else list(d.logprobs)))
            continue
        last.text += d.text
        last.token_ids += d.token_ids
        if d.logprobs is not None:
            last.logprobs = (last.logprobs or []) + d.logprobs
        last.finish_reason, last.usage = d.finish_reason, d.usage
    return out
