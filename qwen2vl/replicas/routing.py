"""Which replica serves a prompt: the one whose caches most likely hold it, unless that one is busy.

A replica's prefix cache hits only on whole blocks from the start of the prompt, keyed by the hash
chain the engine itself computes (`Sequence.hashes`: block i's key covers blocks 0..i, with the
content hashes of the images in them); its vision cache hits on an image's content hash. The router
remembers, per replica, the keys of the prompts it sent there (a bounded LRU, an estimate of what
the replica still caches) and scores each replica for a new prompt:

    (leading blocks found, images found)    e.g. turn 3 of a chat: (12, 1) on the replica that served
                                             turns 1-2, (1, 0) elsewhere (the system prompt's block)

The best score wins; no match at all, or a winner with `max_imbalance` more requests in flight than
the least loaded replica, goes to the least loaded replica instead (ties: the lowest index), so one
hot prefix can't pile every request onto one replica. Plain Python, no Ray: tested with tables.
"""

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class RouteKeys:
    blocks: list[int]  # hash chain of the prompt's full blocks, in order
    images: list[int] = field(default_factory=list)  # content hashes of its images/videos


class Router:
    def __init__(self, num_replicas: int, max_imbalance: int = 4, memory: int = 65536):
        self.load = [0] * num_replicas  # requests in flight on each replica (the ingress is the only sender)
        self.down: set[int] = set()  # replicas that failed a call, until one of their calls succeeds
        self.max_imbalance = max_imbalance
        self.memory = memory  # keys remembered per replica
        self.seen: list[OrderedDict] = [OrderedDict() for _ in range(num_replicas)]

    def pick(self, keys: RouteKeys, exclude: set[int] = frozenset()) -> int:
        """A replica for `keys`, avoiding `exclude` (replicas this request already failed on) and
        replicas marked down while any other is left."""
        live = [r for r in range(len(self.load)) if r not in exclude and r not in self.down]
        if not live:
            live = [r for r in range(len(self.load)) if r not in exclude] or list(range(len(self.load)))
        least = min(live, key=lambda r: (self.load[r], r))
        scores = {r: self.score(r, keys) for r in live}
        best = max(live, key=lambda r: (scores[r], -self.load[r], -r))
        if scores[best] == (0, 0) or self.load[best] > self.load[least] + self.max_imbalance:
            return least
        return best

    def score(self, replica: int, keys: RouteKeys) -> tuple[int, int]:
        seen = self.seen[replica]
        blocks = 0
        for h in keys.blocks:  # a chain: block i is only useful if blocks 0..i-1 are there too
            if h not in seen:
                break
            blocks += 1
        return blocks, sum(h in seen for h in keys.images)

    def record(self, replica: int, keys: RouteKeys) -> None:
        """`replica` was given this prompt: its caches now hold (or will soon) these keys."""
        seen = self.seen[replica]
        for h in (*keys.blocks, *keys.images):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.memory:
            seen.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica that died comes back with empty caches."""
        self.seen[replica].clear()
