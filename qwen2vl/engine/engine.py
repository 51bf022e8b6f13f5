"""The engine core: requests in, one `step()` at a time, increments out. Not thread-safe:
`LLM` drives it in the caller's thread, `AsyncLLM` from one background thread.

    step = schedule -> run the model -> account tokens (scheduler) -> text and stop strings (requests)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.embed import embed_prompts
from qwen2vl.engine.kv_cache import KVCache, num_blocks_for
from qwen2vl.engine.outputs import Delta, EngineStats
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.request import Request
from qwen2vl.engine.runner import ModelRunner
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.scheduler import Scheduler
from qwen2vl.engine.sequence import Sequence
from qwen2vl.engine.served import validate_embed
from qwen2vl.engine.vision_cache import VisionCache


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_gib: float | None = None  # CPU default 2 GiB; on CUDA the default is gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings, capped by the cache
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # per step: decodes + prompt chunks
    enable_prefix_caching: bool = True
    vision_cache_mib: float = 512
    seed: int | None = None  # seeds requests that bring no seed of their own
    enforce_eager: bool = False  # CUDA: no decode graphs (cuda_graph.py), every step launched op by op

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.vision_cache_mib < 0:
            raise ValueError(f"vision_cache_mib must be >= 0, got {self.vision_cache_mib}")


class Engine:
    def __init__(self, model, config: EngineConfig, tokenizer=None, eos_token_ids=(), peak_bytes: int = 0):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        text = model.config.text
        if model.device.type == "cuda" and config.kv_cache_gib is None and not peak_bytes:
            peak_bytes = profile_peak_bytes(model, config)
        num_blocks = num_blocks_for(text, config.block_size, model.dtype, model.device,
                                    kv_cache_gib=config.kv_cache_gib,
                                    gpu_memory_utilization=config.gpu_memory_utilization, peak_bytes=peak_bytes)
        graphs = model.device.type == "cuda" and not config.enforce_eager
        # with graphs, one spare block past the manager's: padding rows of a bucket write there
        self.cache = KVCache(text, num_blocks + int(graphs), config.block_size, model.dtype, model.device)
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings,
                                 num_blocks * config.block_size)
        blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(blocks, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, list(eos_token_ids))
        self.vision_cache = VisionCache(int(config.vision_cache_mib * 2**20))
        self.runner = ModelRunner(model, self.cache, self.vision_cache)
        if graphs:
            from qwen2vl.engine.cuda_graph import build_graph_runner

            self.runner.graphs = build_graph_runner(model, self.cache, config.max_num_seqs, self.max_model_len,
                                                    spare_block=num_blocks)
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(config.seed)

    def validate(self, prompt: Prompt, params: SamplingParams) -> None:
        """What the engine can't serve, as a ValueError for the caller (reads nothing that changes)."""
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this engine's max_model_len is "
                             f"{self.max_model_len} (prompt + at least one generated token)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine was built without one")
        vocab = self.model.config.text.vocab_size
        bad = next((t for t in prompt.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    def validate_embed(self, prompt: Prompt) -> None:
        """What the engine can't embed, as a ValueError."""
        validate_embed(prompt, self.max_model_len, self.model.config.text.vocab_size)

    def embed(self, prompts: list[Prompt], pooling: str = "last") -> torch.Tensor:
        """[B, D] float32 pooled final hidden states (engine/embed.py): prefill only, no cache blocks,
        packed max_num_batched_tokens at a time. Runs between steps; running requests are untouched."""
        for prompt in prompts:
            self.validate_embed(prompt)
        return embed_prompts(self.model, self.runner, prompts, pooling, self.config.max_num_batched_tokens)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, lora: int = 0) -> Request:
        """`lora`: the LoRA adapter slot the request runs with (qwen2vl/lora.py), 0 for the base model."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.validate(prompt, params)
        adapters = getattr(self.model, "lora", None)
        if lora and not (adapters is not None and 0 < lora <= len(adapters.names)):
            raise ValueError(f"LoRA slot {lora} is not loaded")
        seqs = [Sequence(request_id, prompt, params, i, self._seed(params, i), lora) for i in range(params.n)]
        request = self.requests[request_id] = Request(request_id, prompt, params, seqs, self.tokenizer)
        for seq in seqs:
            self.scheduler.add(seq)
        return request

    def abort(self, request_id: str) -> list[Delta]:
        """End a request now and free its blocks; returns its closing increments (reason "abort")."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        return [d for d in (request.update(s, self.scheduler.finish) for s in request.seqs) if d]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Delta]:
        if not self.scheduler.has_work():
            return []
        seqs = self.scheduler.schedule()
        assert seqs, "the scheduler made no progress"  # a lone sequence always fits (max_model_len)
        tokens, logprobs = self.runner.run(seqs)
        self.scheduler.postprocess(seqs, tokens, logprobs)
        deltas = []
        for seq, token in zip(seqs, tokens):
            request = self.requests.get(seq.request_id)
            if token is None or request is None:
                continue
            delta = request.update(seq, self.scheduler.finish)
            if delta is not None:
                deltas.append(delta)
            if request.finished:
                del self.requests[request.request_id]  # the caller holds the Request for its output
        return deltas

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_blocks=blocks.num_blocks, num_free_blocks=blocks.num_free_blocks, block_size=blocks.block_size,
            prefix_cache_queries=blocks.prefix_queries, prefix_cache_hits=blocks.prefix_hits,
            vision_cache_hits=self.vision_cache.hits, vision_cache_misses=self.vision_cache.misses,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _seed(self, params: SamplingParams, index: int) -> int:
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        return (seed + index) % 2**64


@torch.inference_mode()
def profile_peak_bytes(model, config: EngineConfig) -> int:
    """CUDA memory a step of max_num_batched_tokens takes beyond the weights, measured by running
    one (with a 20% margin: the paged path gathers keys the plain causal path does not)."""
    from qwen2vl.attention import causal_attend

    n = config.max_num_batched_tokens
    torch.cuda.synchronize(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    before = torch.cuda.memory_allocated(model.device)
    x = torch.zeros(n, model.config.text.hidden_size, dtype=model.dtype, device=model.device)
    positions = torch.arange(n, device=model.device).expand(3, -1)
    if getattr(model, "lora", None) is not None:  # LoRA linears need a slot per row; their matmuls count too
        model.lora.set([0], [n], model.device)
    hidden = model.model(x, positions, causal_attend)
    if getattr(model, "lora", None) is not None:  # the head reads a slot per logits row (token_rows.py)
        model.lora.set([0], [min(n, config.max_num_seqs)], model.device)
    model.compute_logits(hidden[: min(n, config.max_num_seqs)])
    del x, hidden
    peak = torch.cuda.max_memory_allocated(model.device) - before
    torch.cuda.empty_cache()
    return int(peak * 1.2)
