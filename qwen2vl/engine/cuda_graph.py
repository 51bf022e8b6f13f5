"""CUDA graphs for decode steps: the decoder captured once per batch-size bucket, replayed per step.

Why: a batch-1 decode step of the 2B model is ~28 layers x ~15 small kernels. Launched one by one
from Python they cost more than they compute (74 ms/token on an H100, benchmarks/results/gpu_check_h100.log);
a graph replays them all with one launch.

A graph bakes in tensor addresses and shapes, so every input of a step lives in a static buffer
that the step overwrites: token ids [B], positions [B] (a generated token's three M-RoPE rows are
equal), slot_mapping [B], context lengths [B] and block tables [B, W]; the graph for bucket B reads
the first B rows. A batch of n < B is padded: token 0 at position 0, context length 1, and a slot
in a spare cache block that the engine never hands to a sequence, so padding never writes into
anyone's KV. Stale table entries are harmless: they are valid block ids and lie past every
sequence's length, where attention does not look (Triton) or gathers the sequence's own first
slot instead, masked (torch). A padding row may attend to a slot nothing wrote (the cache is
uninitialized): its output may be NaN, but rows never mix in the decoder, and it is dropped.

Attention inside a graph can't read host values. The Triton kernel (triton_decode.py) walks each
sequence's blocks up to its length, read on the device; the torch fallback (`decode_padded`)
gathers a fixed width of `max_context` tokens and masks past each length, so it is only used while
every context fits TORCH_MAX_CONTEXT. Which one: QWEN2VL_DECODE_ATTENTION=triton|torch, else Triton
when it imports and agrees with torch on a random cache at startup.

Only decodes of generated tokens take this path; prompt chunks, vision, larger batches and longer
contexts run eagerly as before. Anything failing at capture leaves the engine eager, with a warning.
"""

from __future__ import annotations

import logging
import os

import torch

from qwen2vl.backends.paged_attention import PagedBatch, decode_padded
from qwen2vl.engine.kv_cache import KVCache
from qwen2vl.engine.sequence import Sequence

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256)
TORCH_MAX_CONTEXT = 4096  # the fallback gathers this many keys per sequence and layer


class GraphRunner:
    def __init__(self, model, cache: KVCache, max_num_seqs: int, max_model_len: int, spare_block: int,
                 attention: str = "torch", capture: bool = True):
        """`capture=False` runs the same static-buffer forward without a graph (CPU tests)."""
        assert attention in ("triton", "torch")
        self.model, self.cache, self.attention = model, cache, attention
        bs = cache.block_size
        self.max_context = max_model_len if attention == "triton" else min(max_model_len, TORCH_MAX_CONTEXT)
        self.width = -(-self.max_context // bs)  # block-table columns
        top = min(max_num_seqs, BUCKETS[-1])  # larger batches are compute-bound: launches matter less
        self.buckets = sorted({b for b in BUCKETS if b < top} | {top})
        self.max_batch = self.buckets[-1]
        self.spare_slot = spare_block * bs
        dev = model.device
        self.inputs = torch.zeros(4 * self.max_batch, dtype=torch.long, device=dev)  # ids|pos|slots|lens
        self.tables = torch.zeros(self.max_batch, self.width, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> its graph's hidden states [B, D]
        self.num_replays = 0
        if capture:
            self.capture()

    def can_run(self, seqs: list[Sequence]) -> bool:
        """Every sequence computes one generated token (no prompt, no vision) and fits the graphs."""
        return len(seqs) <= self.max_batch and all(
            s.num_scheduled_tokens == 1 and s.num_cached_tokens == s.num_tokens - 1 >= s.num_prompt_tokens
            and s.num_tokens <= self.max_context for s in seqs
        )

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Final hidden states [n, D] of the n sequences' new tokens (a view into a static buffer:
        use it before the next step)."""
        n, bs = len(seqs), self.cache.block_size
        b = next(x for x in self.buckets if x >= n)
        pad = b - n
        ctx = [s.num_tokens for s in seqs]  # the new token sits at cache index ctx - 1
        need = [-(-c // bs) for c in ctx]  # blocks holding each context
        w = max(need)
        host = (
            [s.token_ids[c - 1] for s, c in zip(seqs, ctx)] + [0] * pad
            + [c - 1 + s.prompt.rope_delta for s, c in zip(seqs, ctx)] + [0] * pad
            + [s.block_table[(c - 1) // bs] * bs + (c - 1) % bs for s, c in zip(seqs, ctx)] + [self.spare_slot] * pad
            + ctx + [1] * pad
            + [x for s, k in zip(seqs, need) for x in s.block_table[:k] + [0] * (w - k)]
        )
        staged = torch.tensor(host, dtype=torch.long).to(self.inputs.device, non_blocking=True)  # one copy
        self.inputs[: 4 * b].copy_(staged[: 4 * b])
        self.tables[:n, :w].copy_(staged[4 * b :].view(n, w))
        if b in self.graphs:
            self.graphs[b].replay()
            out = self.outputs[b]
        else:
            out = self.forward(b)
        self.num_replays += 1
        return out[:n]

    def forward(self, b: int) -> torch.Tensor:
        """The decoder over the static buffers of bucket b -> hidden [b, D]; what the graph holds."""
        ids, pos, slots, lens = self.inputs[: 4 * b].view(4, b)
        tables, cache = self.tables[:b], self.cache
        if self.attention == "triton":
            from qwen2vl.backends.cuda import triton_decode

            attn = lambda layer, q: triton_decode.decode(q, cache.k[layer], cache.v[layer], tables, lens)
        else:
            ctx_slots = PagedBatch.context_slots(tables, cache.block_size, self.max_context, lens)  # [b, max_context]
            attn = lambda layer, q: decode_padded(q, cache.k[layer], cache.v[layer], ctx_slots, lens)

        def attend(layer, q, k, v):
            self.model.backend.write_kv(k, v, *cache.layers[layer], slots)
            return attn(layer, q)

        x = self.model.model.embed_tokens(ids)  # generated tokens: never image/video pads to fill
        return self.model.model(x, pos.expand(3, -1), attend)

    def pad_inputs(self, b: int) -> None:
        ids, pos, slots, lens = self.inputs[: 4 * b].view(4, b)
        ids.zero_(), pos.zero_(), slots.fill_(self.spare_slot), lens.fill_(1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, all sharing one memory pool (one graph runs at a time)."""
        pool = None
        for b in reversed(self.buckets):
            self.pad_inputs(b)
            self.forward(b)  # warm-up outside the graph: Triton compiles, cuBLAS picks kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b], self.outputs[b] = graph, out
        torch.cuda.synchronize()


def pick_attention(model, cache: KVCache) -> str:
    """"triton" when asked for or by default if it imports and matches torch here, else "torch"."""
    choice = os.environ.get("QWEN2VL_DECODE_ATTENTION", "").lower()
    if choice == "torch":
        return "torch"
    try:
        check_triton(cache.k.shape[-2], model.config.text.num_attention_heads, cache.k.shape[-1],
                     cache.block_size, cache.k.dtype, model.device)
        return "triton"
    except Exception as e:  # no triton, a compile error, or wrong numbers: all mean the fallback
        if choice == "triton":
            raise
        log.warning("Triton decode attention unavailable (%s); CUDA graphs use the torch fallback", e)
        return "torch"


def check_triton(hkv: int, hq: int, dh: int, block_size: int, dtype, device) -> None:
    """Run the kernel once against the torch path on a random cache with mixed lengths; raise on
    any difference beyond rounding."""
    from qwen2vl.backends.cuda import triton_decode

    g = torch.Generator(device=device).manual_seed(0)
    lens = torch.tensor([1, 3 * block_size + 5, block_size, 77], device=device)
    width = -(-int(lens.max()) // block_size)
    num_blocks = len(lens) * width + 1
    k, v = (torch.randn(num_blocks, block_size, hkv, dh, generator=g, device=device, dtype=dtype) for _ in "kv")
    tables = torch.randperm(num_blocks, generator=g, device=device)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), hq, dh, generator=g, device=device, dtype=dtype)
    got = triton_decode.decode(q, k, v, tables, lens)
    want = decode_padded(q, k, v, PagedBatch.context_slots(tables, block_size, width * block_size, lens), lens)
    err = (got.float() - want.float()).abs().max().item()
    if not err <= 5e-2:  # bf16 rounding (SDPA rounds probabilities to bf16, the kernel does not); NaN fails
        raise RuntimeError(f"Triton decode differs from torch by {err:.3g}")


def build_graph_runner(model, cache: KVCache, max_num_seqs: int, max_model_len: int, spare_block: int,
                       attention: str | None = None) -> GraphRunner | None:
    """Capture the decode graphs, or log why not and return None (the engine then runs eagerly)."""
    try:
        attention = attention or pick_attention(model, cache)
        runner = GraphRunner(model, cache, max_num_seqs, max_model_len, spare_block, attention)
    except Exception as e:
        log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e)
        return None
    log.info("CUDA graphs: %d decode buckets up to batch %d, %s attention, contexts up to %d tokens",
             len(runner.buckets), runner.max_batch, attention, runner.max_context)
    return runner
