"""The runner's packing of a decode step (ModelRunner.prepare) against the list-based packing it
replaced, which flattened every block table and built every slot from Python lists each step.

    python -m benchmarks.engine_prepare
    python -m benchmarks.engine_prepare --batches 32 128 --contexts 64 2048 --steps 64

B sequences of context L decode --steps steps (one token each, a block appended every block_size
tokens), block size 16, blocks handed out in a shuffled order, on the CPU (prepare's own host work;
no model). Both packings run on the same sequences, alternating step by step; the time per step is
the median of this thread's CPU time (other jobs on the machine do not count), the ratio is list / ours.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import OrderedDict
from types import SimpleNamespace

import torch

from qwen2vl.backends.paged_attention import PagedBatch
from qwen2vl.engine.block_manager import BlockManager
from qwen2vl.engine.block_tables import BlockTables
from qwen2vl.engine.prompt import Prompt
from qwen2vl.engine.runner import ModelRunner
from qwen2vl.engine.sampling_params import SamplingParams
from qwen2vl.engine.sequence import Sequence, Status

BS = 16


def list_pack(seqs: list[Sequence], bs: int):
    """The packing before block_tables.py (decode steps: no prompt chunks), as it was."""
    ids, pos, slots, q_starts, q_lens, ctx_lens = [], [], [], [], [], []
    for seq in seqs:
        start, end = seq.num_cached_tokens, seq.num_cached_tokens + seq.num_scheduled_tokens
        table = seq.block_table
        ids += seq.token_ids[start:end]
        pos += range(start + seq.prompt.rope_delta, end + seq.prompt.rope_delta)
        slots += [table[i // bs] * bs + i % bs for i in range(start, end)]
        q_starts.append(len(ids) - (end - start))
        q_lens.append(end - start)
        ctx_lens.append(end)
    n, b = len(ids), len(seqs)
    width = max(len(s.block_table) for s in seqs)
    tables = [x for s in seqs for x in s.block_table + [0] * (width - len(s.block_table))]
    dev = torch.tensor(ids + pos + slots + ctx_lens + tables, dtype=torch.long)
    ids_t, pos_t, slots_t, ctx_t = dev[: 3 * n + b].split([n, n, n, b])
    batch = PagedBatch(slot_mapping=slots_t, q_starts=q_starts, q_lens=q_lens, ctx_lens=ctx_lens,
                       ctx_slots=PagedBatch.context_slots(dev[3 * n + b :].view(b, width), bs, max(ctx_lens), ctx_t),
                       ctx_lens_t=ctx_t)
    return ids_t, pos_t.expand(3, -1), batch


def decoding(batch: int, context: int, steps: int) -> tuple[BlockManager, list[Sequence]]:
    bm = BlockManager(batch * (-(-(context + steps) // BS)), BS, enable_prefix_caching=False)
    bm.free = OrderedDict.fromkeys(torch.randperm(bm.num_blocks, generator=torch.Generator().manual_seed(0)).tolist())
    seqs = []
    for i in range(batch):
        s = Sequence(str(i), Prompt(list(range(context)), [], torch.zeros(3, context, dtype=torch.long), 0),
                     SamplingParams())
        assert bm.allocate(s)
        s.status, s.num_cached_tokens, s.num_scheduled_tokens = Status.RUNNING, context - 1, 1
        seqs.append(s)
    return bm, seqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, block size {BS}, {args.steps} decode steps")
    for context in args.contexts:
        for batch in args.batches:
            bm, seqs = decoding(batch, context, args.steps)
            runner = SimpleNamespace(cache=SimpleNamespace(block_size=BS), device=torch.device("cpu"),
                                     tables=BlockTables())
            times = {"list": [], "ours": []}
            for step in range(args.steps):
                for kind in ("list", "ours") if step % 2 else ("ours", "list"):
                    t0 = time.thread_time()
                    ModelRunner.prepare(runner, seqs) if kind == "ours" else list_pack(seqs, BS)
                    times[kind].append(time.thread_time() - t0)
                for s in seqs:  # the step ran: one more token each
                    s.append_token(1)
                    s.num_cached_tokens += 1
                    bm.append(s)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"context {context:5}, batch {batch:4}: list {ms['list']:.3f} ms, ours {ms['ours']:.3f} ms, "
                  f"list / ours {ms['list'] / ms['ours']:.2f}")


if __name__ == "__main__":
    main()
