"""One engine replica: a Ray Serve deployment that owns an AsyncLLM and streams its deltas.

Each replica is its own single-replica deployment (`qwen2vl-engine-0`, `-1`, ...), so the ingress
can address one replica by name: prefix/image affinity and "retry on another replica" need that,
and a deployment handle over N replicas picks one itself. Ray Serve's controller restarts a replica
that dies; the ingress routes around it meanwhile (pool.py).

The class is plain (launch.py wraps it with `serve.deployment`), so this file does not import Ray.
"""

import os

import torch

from qwen2vl.engine.async_engine import AsyncLLM
from qwen2vl.engine.outputs import EngineStats
from qwen2vl.server.structured import GrammarCompiler


class EngineReplica:
    def __init__(self, model: str, llm_args: dict, torch_threads: int | None = None):
        """`llm_args`: LLM's keyword arguments, passed on unchanged (dtype, device, quantization, lora,
        kv_cache_gib, max_model_len, ... and whatever else LLM accepts)."""
        if torch_threads:  # a replica sharing a machine with others: its share of the cores
            torch.set_num_threads(torch_threads)
        self.engine = AsyncLLM(model, **llm_args)
        served = self.engine.served
        # structured output and forced tool calls arrive as grammars, enforced here (server/structured.py)
        self.grammars = GrammarCompiler(served.processor.tokenizer.backend.to_str(), served.config.text.vocab_size,
                                        served.eos_token_ids)

    def describe(self) -> dict:
        """The facts the ingress can't read from the checkpoint folder: they depend on how the
        engine was built (context length, adapters) and where it runs."""
        served = self.engine.served
        return {"max_model_len": served.max_model_len, "eos_token_ids": served.eos_token_ids,
                "lora_names": served.lora_names, "block_size": self.engine.engine.config.block_size,
                "pid": os.getpid()}

    async def generate(self, prompt, params, request_id: str, lora: str | None):
        """Deltas of one request (a streaming method: the ingress calls it with stream=True).
        Cancelling the call on the ingress cancels this generator, which aborts the request."""
        async for delta in self.engine.generate(prompt, params, request_id=request_id, lora=lora):
            yield delta

    async def embed(self, prompts) -> torch.Tensor:
        return await self.engine.embed(prompts)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and not engine.stopped:
            engine.shutdown()
