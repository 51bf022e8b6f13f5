"""One sequence being generated: its tokens, where its KV lives, and how far it has been computed.

A request with n > 1 has n sequences sharing one `Prompt`. The invariant the scheduler keeps:
`num_cached_tokens` tokens have KV in the blocks of `block_table`; this step computes the next
`num_scheduled_tokens`; the last token of a running decode is the one sampled last step.
"""

from __future__ import annotations

import enum
import hashlib
from itertools import count

import torch

from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    _ids = count()

    def __init__(self, request_id: str, prompt: Prompt, params: SamplingParams, index: int = 0,
                 seed: int = 0, lora: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt = prompt
        self.params = params
        self.seed = seed  # in [0, 2**64): with the step, all a draw's noise depends on (sampler.py)
        self.lora = lora  # LoRA adapter slot (qwen2vl/lora.py), 0 for the base model
        self.token_ids = list(prompt.token_ids)
        self.num_prompt_tokens = len(prompt)
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_prefix_hit_tokens: int | None = None  # prompt tokens the prefix cache served, once admitted
        self.block_hashes: list[int] = []  # hash chain over full blocks, grown as blocks fill
        self.vision_embeds: dict[int, torch.Tensor] = {}  # item index -> encoder rows, held during prefill
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def is_prefilling(self) -> bool:
        # more than the last sampled token is missing from the cache
        return self.num_tokens - self.num_cached_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def hashes(self, block_size: int) -> list[int]:
        """Hash chain of every full block: block i's hash covers blocks 0..i, their token ids, the
        content hashes of the images/videos whose pads fall in them and their M-RoPE positions (the
        same pixels placed at another time, Qwen2.5-VL's video at another sampled fps, give other
        keys). The chain starts from the LoRA slot: an adapter changes k and v, so its blocks are
        never another adapter's."""
        for i in range(len(self.block_hashes), self.num_tokens // block_size):
            start, end = i * block_size, (i + 1) * block_size
            prev = self.block_hashes[-1] if self.block_hashes else self.lora
            vision = [v.content_hash for v in self.prompt.vision if v.offset < end and v.end > start]
            positions = self.prompt.positions_for(start, end)
            self.block_hashes.append(block_hash(prev, self.token_ids[start:end], vision, positions))
        return self.block_hashes


def block_hash(prev: int, token_ids: list[int], vision_hashes: list[int], positions: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev.to_bytes(16, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    for v in vision_hashes:
        h.update(v.to_bytes(16, "little"))
    h.update(positions.numpy().tobytes())  # [3, block] int64
    return int.from_bytes(h.digest(), "little")
