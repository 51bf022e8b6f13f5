"""Which KV-cache blocks belong to whom: a free list, reference counts, and the prefix cache.

A block holds `block_size` consecutive tokens of one sequence (slot = block_id * block_size + i).
Prefix caching: once a full block's KV is computed it is registered under its hash chain value
(`Sequence.hashes`), and a later sequence whose chain matches takes the same block (ref count + 1)
instead of computing it again. A freed block keeps its registration while it sits on the free list,
so a finished conversation's prefix stays reusable until the block is handed out again; blocks are
handed out least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from qwen2vl.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # tokens looked up / found, for metrics
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence) -> bool:
        """Blocks for all of a waiting sequence's tokens, the longest cached prefix reused.

        Returns False, changing nothing, when the free list is too short. At least the last token
        is always left to compute: its logits are needed.
        """
        assert not seq.block_table
        hits = self._match(seq)
        new = self.blocks_for(seq.num_tokens) - len(hits)
        revived = sum(self.ref_counts[b] == 0 for b in hits)  # cached but free: they leave the free list
        if new + revived > len(self.free):
            return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = hits + [self._take() for _ in range(new)]
        seq.num_cached_tokens = len(hits) * self.block_size
        if seq.num_prefix_hit_tokens is None:  # first admission, not a re-admission after preemption
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_tokens
            seq.num_prefix_hit_tokens = seq.num_cached_tokens
        return True

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token has (or can get) a slot."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= len(self.free)

    def append(self, seq: Sequence) -> None:
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._take())

    def free_seq(self, seq: Sequence) -> None:
        # last block first, so a shared prefix is the last thing handed out again
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free[b] = None
        seq.block_table = []
        seq.num_cached_tokens = 0

    def cache_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Register the blocks that became full while tokens start..end-1 were computed."""
        if not self.enable_prefix_caching:
            return
        hashes = seq.hashes(self.block_size)
        for i in range(start // self.block_size, end // self.block_size):
            h, b = hashes[i], seq.block_table[i]
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h

    def _match(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in seq.hashes(self.block_size)[: (seq.num_tokens - 1) // self.block_size]:
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _take(self) -> int:
        b, _ = self.free.popitem(last=False)
        assert self.ref_counts[b] == 0
        h = self.block_hash[b]
        if h is not None:  # its old contents are about to be overwritten
            del self.cached[h]
            self.block_hash[b] = None
        self.ref_counts[b] = 1
        return b
