"""Where a batch-1 graphed decode step's time goes on a GPU (2B shapes, random weights).

Prints, on one engine with CUDA graphs: the engine step (median ms over `--steps` decode steps),
the decode graph's replay alone (replay + sync), the head and sampling alone, and the host-side
Python by function (cProfile over the same steps, by own time). The difference between the step
and replay + head + sampling is host work the GPU waits for.

    python -m benchmarks.gpu_decode_profile --tokenizer .cache/qwen_tokenizer [--steps 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path

import torch

from benchmarks.gpu_check import build_checkpoint, log, text_messages


def timed(fn, reps: int) -> float:
    """Median seconds of fn() followed by a device sync."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".cache/qwen_tokenizer")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    from qwen2vl import LLM, SamplingParams
    from qwen2vl.engine.sampler import sample

    folder = Path("/tmp/qwen2vl-2b-random")
    if not (folder / "config.json").is_file():
        build_checkpoint(folder, Path(args.tokenizer))  # leaves transformers' copy to the collector
        torch.cuda.empty_cache()
    llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_gib=1.0)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    log(f"{torch.cuda.get_device_name()}; decode graphs: {graphs.attention if graphs else 'none'}")
    params = SamplingParams(temperature=0, max_tokens=3 * args.steps + 8, ignore_eos=True)
    engine.add_request("profile", llm.prompt(text_messages(7)), params)
    while not engine.step():  # prefill and the first token
        pass
    for _ in range(8):  # warm
        engine.step()
    step = timed(engine.step, args.steps)
    seqs = list(engine.scheduler.running)
    replay = timed(graphs.graphs[1].replay, args.steps)
    hidden = graphs.outputs[1][:1]
    head = timed(lambda: llm.model.compute_logits(hidden), args.steps)
    logits = llm.model.compute_logits(hidden)
    sampling = timed(lambda: sample(logits.clone(), seqs), args.steps)
    inputs = timed(lambda: graphs.run(seqs), args.steps) - replay
    log(f"batch-1 decode step {step * 1e3:.3f} ms ({1 / step:.1f} tok/s); graph replay alone {replay * 1e3:.3f} ms; "
        f"head {head * 1e3:.3f} ms; sampling (greedy, with the host copy) {sampling * 1e3:.3f} ms; "
        f"graph inputs staged on the host {inputs * 1e3:.3f} ms; rest of the step (scheduler, outputs, "
        f"detokenizer) {(step - replay - head - sampling - inputs) * 1e3:.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    log(f"cProfile of {args.steps} decode steps (own time):\n{out.getvalue()}")


if __name__ == "__main__":
    main()
