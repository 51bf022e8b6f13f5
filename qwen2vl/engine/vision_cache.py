"""Vision-encoder outputs kept by content hash, least recently used out first.

The same picture in a follow-up turn, in another request, or in a prompt recomputed after
preemption is encoded once. Bounded by bytes, not entries: one video can outweigh many images.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def get(self, key: int) -> torch.Tensor | None:
        embeds = self.entries.get(key)
        if embeds is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return embeds

    def put(self, key: int, embeds: torch.Tensor) -> None:
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self.entries:
            return  # too big to keep: the caller still holds it for the prompt that needs it
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = embeds
        self.bytes += size
