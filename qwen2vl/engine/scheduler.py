"""Which sequences run this step, and how many of their tokens.

One token budget per step, shared by everyone (continuous batching with chunked prefill):
1. running sequences that decode come first (one token each), so streams keep flowing;
2. then running sequences still prefilling take a chunk of what is left of the budget;
3. then waiting sequences are admitted, first come first served, while blocks and budget last.
A waiting sequence gets blocks for its whole prompt at admission, so only decodes ever need a new
block. When one cannot get it, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (its full blocks usually
come straight back from the prefix cache). No request is ever dropped.
"""

from __future__ import annotations

from collections import deque

from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: list[int]):
        assert max_model_len <= blocks.num_blocks * blocks.block_size, "a lone sequence must always fit"
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.num_tokens < self.max_model_len
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        ids: set[int] = set()
        preempted = False
        for seq in sorted(self.running, key=lambda s: s.is_prefilling):  # stable: decodes first
            if budget == 0 or len(scheduled) == self.max_num_seqs:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            while not self.blocks.can_append(seq):
                victim = next(s for s in reversed(self.running) if s.seq_id not in ids)
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.blocks.append(seq)
            budget -= self._take(seq, budget)
            scheduled.append(seq)
            ids.add(seq.seq_id)
        while not preempted and self.waiting and budget and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.index > 0 and any(s.request_id == seq.request_id and s.is_prefilling for s in self.running):
                break  # n > 1: let the first completion fill the prefix cache, then share its blocks
            if not self.blocks.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= self._take(seq, budget)
            scheduled.append(seq)
        return scheduled

    def _take(self, seq: Sequence, budget: int) -> int:
        seq.num_scheduled_tokens = min(seq.num_tokens - seq.num_cached_tokens, budget)
        assert seq.num_scheduled_tokens > 0
        return seq.num_scheduled_tokens

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.vision_embeds.clear()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], tokens: list[int | None], logprobs: list | None = None) -> None:
        """Account for a finished step: new KV, new tokens, token-level stops (eos, stop ids, length).

        `tokens[i]` is None when seqs[i] ran a prompt chunk that did not reach the prompt's end.
        """
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            start = seq.num_cached_tokens
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.blocks.cache_blocks(seq, start, seq.num_cached_tokens)
            if seq.num_cached_tokens >= seq.num_prompt_tokens:
                seq.vision_embeds.clear()  # prompt done: the vision cache keeps them if room
            if token is None:
                continue
            seq.append_token(token)
            if logprobs is not None and logprobs[i] is not None:
                seq.logprobs.append(logprobs[i])
            p = seq.params
            if token in p.stop_token_ids:
                self.finish(seq, "stop", stop_reason=token)
            elif not p.ignore_eos and token in self.eos_token_ids:
                self.finish(seq, "stop")
            elif (p.max_tokens is not None and seq.num_completion_tokens >= p.max_tokens) or \
                    seq.num_tokens >= self.max_model_len:
                self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """End a sequence (done, stop string, or aborted) and free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        seq.vision_embeds.clear()
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
