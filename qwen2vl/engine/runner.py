"""One step on the model: pack the scheduled tokens, attach vision rows, run, sample.

Packing: sequence by sequence, the tokens [num_cached_tokens, num_cached_tokens + num_scheduled)
go into one row list of length N, with their M-RoPE positions [3, N] and the cache slot each
token's k/v goes to (`slot_mapping`). Only sequences whose chunk reaches their last token are
sampled; a prompt chunk that stops short only fills the cache.

Vision: an image's encoder output is needed when a chunk covers any of its pads. It comes from the
sequence (held while its prompt is being prefilled), else the vision cache, else the encoder, which
runs once per step over every missing picture of every sequence; each chunk takes its slice.
"""

from __future__ import annotations

import torch

from qwen2vl.backends.paged_attention import PagedAttend, PagedBatch
from qwen2vl.engine.block_tables import BlockTables
from qwen2vl.engine.kv_cache import KVCache
from qwen2vl.engine.sampler import Sampler
from qwen2vl.engine.sequence import Sequence
from qwen2vl.engine.vision_cache import VisionCache
from qwen2vl.token_rows import attached_token_rows


class ModelRunner:
    def __init__(self, model, cache: KVCache, vision_cache: VisionCache):
        self.model = model
        self.cache = cache
        self.vision_cache = vision_cache
        self.backend = model.backend  # backends/: writes k/v and attends over the cache
        self.device = model.device
        self.graphs = None  # cuda_graph.GraphRunner: the engine sets it on CUDA unless enforce_eager
        self.lora = getattr(model, "lora", None)  # LoRARows of served adapters (qwen2vl/lora.py), or None
        # an adapter's own token rows rescore its tokens in the head, which then needs a slot per logits row
        self.lora_head = self.lora is not None and attached_token_rows(model) is not None
        # where the backend has one (the CPU's C kernels), a whole decode step in one call
        self.decode_step = self.backend.decode_step(model, cache)
        self.sample = Sampler(self.device, self.backend.top_k)
        self.tables = BlockTables()  # block tables kept between steps, one row per running sequence

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> tuple[list[int | None], list]:
        """Tokens (None for a prompt chunk that stops short) and logprob entries, one per sequence."""
        if self.graphs is not None and self.graphs.can_run(seqs):  # all decodes: replay a graph
            return self.sample(self.model.compute_logits(self.graphs.run(seqs)), seqs)
        ids, positions, batch = self.prepare(seqs)
        if self.lora is not None:  # each token row's adapter, read by the LoRA linears in this forward
            self.lora.set([s.lora for s in seqs], batch.q_lens, self.device)
        x = self.model.embed(ids, vision_embeds=self.vision_rows(seqs))
        attend = PagedAttend(self.backend, self.cache.layers, batch)  # writes k/v to the cache, attends over it
        if self.decode_step is not None and batch.is_decode and x.dtype == torch.bfloat16:
            hidden = self.decode_step(x, positions, batch)  # the same kernels, called from C
        else:
            hidden = self.model.model(x, positions, attend)  # [N, D]
        done = [i for i, s in enumerate(seqs) if s.num_cached_tokens + s.num_scheduled_tokens == s.num_tokens]
        tokens: list[int | None] = [None] * len(seqs)
        logprobs: list = [None] * len(seqs)
        if done:
            rows = torch.tensor([batch.q_starts[i] + batch.q_lens[i] - 1 for i in done], device=self.device)
            if self.lora_head:
                self.lora.set([seqs[i].lora for i in done], [1] * len(done), self.device)
            sampled, lps = self.sample(self.model.compute_logits(hidden.index_select(0, rows)), [seqs[i] for i in done])
            for i, t, lp in zip(done, sampled, lps):
                tokens[i], logprobs[i] = t, lp
        return tokens, logprobs

    def prepare(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, PagedBatch]:
        """Ids [N], positions [3, N] and the batch's slots and tables: one host tensor, one copy.

        The host loop is per sequence, not per token or block: the block tables are kept between
        steps (block_tables.py), and each token's slot and position come from tensor ops over its
        index in its sequence. A generated token's three M-RoPE rows are equal (cache index +
        rope_delta), so only prompt chunks read the prompt's position table."""
        bs = self.cache.block_size
        rows = self.tables.rows(seqs)
        ids, starts, q_starts, q_lens, ctx_lens, deltas = [], [], [], [], [], []
        prompt_parts = []  # (column, [3, n] positions) of prompt chunks
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            if start < seq.num_prompt_tokens:
                prompt_parts.append((len(ids), seq.prompt.positions[:, start : min(end, seq.num_prompt_tokens)]))
            q_starts.append(len(ids))
            ids += seq.token_ids[start:end]
            starts.append(start)
            q_lens.append(end - start)
            ctx_lens.append(end)
            deltas.append(seq.prompt.rope_delta)
        n, b = len(ids), len(seqs)
        width = -(-max(ctx_lens) // bs)
        host = torch.tensor(ids + starts + q_lens + deltas + rows, dtype=torch.long)
        ids_h, start_h, qlen_h, delta_h, rows_h = host.split([n, b, b, b, b])
        tables = self.tables.table[:, :width].index_select(0, rows_h)  # [B, W]
        if n == b:  # decodes only: token i is sequence i's, at cache index start
            index, delta = start_h, delta_h
            block = tables.gather(1, (index // bs)[:, None]).squeeze(1)
        else:  # a token's index in its sequence: its sequence's start + its offset in the chunk
            seq_of = torch.repeat_interleave(torch.arange(b), qlen_h)  # [N]
            index = torch.arange(n) + (start_h - torch.tensor(q_starts)).index_select(0, seq_of)
            block = tables.view(-1).index_select(0, seq_of * width + index // bs)
            delta = delta_h.index_select(0, seq_of)
        slots, pos = block * bs + index % bs, index + delta
        packed = torch.cat([ids_h, pos, slots, start_h + qlen_h, tables.flatten()])
        if prompt_parts:  # prompt positions differ per row: fill them in on the host
            positions = pos.repeat(3, 1)
            for col, part in prompt_parts:
                positions[:, col : col + part.shape[1]] = part
            positions = positions.to(self.device, non_blocking=True)
        dev = packed.to(self.device, non_blocking=True)
        ids_t, pos_t, slots_t, ctx_t = dev[: 3 * n + b].split([n, n, n, b])
        tables_t = dev[3 * n + b :].view(b, width)
        batch = PagedBatch(
            slot_mapping=slots_t, q_starts=q_starts, q_lens=q_lens, ctx_lens=ctx_lens,
            ctx_slots=PagedBatch.context_slots(tables_t, bs, max(ctx_lens), ctx_t), ctx_lens_t=ctx_t,
            ctx_run=consecutive_run(seqs[0].block_table, bs) if b == 1 else None,
        )
        return ids_t, positions if prompt_parts else pos_t.expand(3, -1), batch

    def vision_rows(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Encoder rows for every pad token in this step's chunks, in packing order."""
        slices, missing = [], {}
        for seq in seqs:
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
            for j, item in enumerate(seq.prompt.vision):
                if item.end <= start or item.offset >= end:
                    continue
                if j not in seq.vision_embeds:
                    embeds = self.vision_cache.get(item.content_hash)
                    if embeds is None:
                        missing[item.content_hash] = item
                    else:
                        seq.vision_embeds[j] = embeds
                slices.append((seq, j, max(start, item.offset) - item.offset, min(end, item.end) - item.offset))
        if not slices:
            return None
        if missing:
            encoded = self.encode(list(missing.values()))
            for seq, j, _, _ in slices:
                if j not in seq.vision_embeds:
                    seq.vision_embeds[j] = encoded[seq.prompt.vision[j].content_hash]
        return torch.cat([seq.vision_embeds[j][lo:hi] for seq, j, lo, hi in slices])

    def encode(self, items: list) -> dict[int, torch.Tensor]:
        """Run the vision tower once over several pictures; cache and return their rows by hash."""
        pixels = torch.cat([it.pixel_values for it in items]).to(self.device)  # the tower casts to its dtype
        grids = torch.tensor([it.grid_thw for it in items], dtype=torch.long)  # the tower reads it on the host
        rows = self.model.visual(pixels, grids).to(self.model.dtype)  # [sum(t*h*w) / merge^2, D], grid order
        out = {}
        for it, embeds in zip(items, torch.split(rows, [it.num_tokens for it in items])):
            out[it.content_hash] = embeds
            self.vision_cache.put(it.content_hash, embeds)
        return out


def consecutive_run(block_table: list[int], block_size: int) -> int | None:
    """The first slot of a block table whose blocks are consecutive (b, b+1, ...), else None."""
    first = block_table[0]
    return first * block_size if block_table == list(range(first, first + len(block_table))) else None
