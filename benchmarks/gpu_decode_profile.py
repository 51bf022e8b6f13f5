"""Where a batch-1 graphed decode step's time goes on a GPU (2B shapes, random weights).

Prints, on one engine with CUDA graphs: the engine step (median ms over `--steps` decode steps),
the decode graph's replay alone (replay + sync), the head and sampling alone, and the host-side
Python by function (cProfile over the same steps, by own time). The difference between the step
and replay + head + sampling is host work the GPU waits for.

With the decoder's small ops as torch ops; as Triton kernels (kernels/triton_layer_ops.py) with
gate/up fused and the k/v cache write in one launch, the decode attention walking each context
whole; and the same with the attention split over the context (engine/triton_decode.py; all of
it what LLM does on CUDA), in turn (torch twice, first and last, for drift), with the greedy
tokens of each on one prompt and, for the Triton variants, the decode graph's kernels by GPU time
(torch.profiler).

    python -m benchmarks.gpu_decode_profile --tokenizer .cache/qwen_tokenizer [--steps 64] [--cprofile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
from pathlib import Path

import torch

from benchmarks.gpu_check import build_checkpoint, cuda_time, log, text_messages
from qwen2vl import SamplingParams
from qwen2vl.backends.cuda import triton_kernels
from qwen2vl.backends.reference import TorchBackend


def profile(llm, steps: int, label: str, with_cprofile: bool) -> list[int]:
    """Times a batch-1 decode step and its parts on `llm`; returns the greedy tokens it generated."""
    from qwen2vl.engine.sampler import sample

    engine, graphs = llm.engine, llm.engine.runner.graphs
    params = SamplingParams(temperature=0, max_tokens=3 * steps + 8, ignore_eos=True)
    engine.add_request(label, llm.prompt(text_messages(7)), params)
    while not engine.step():  # prefill and the first token
        pass
    for _ in range(8):  # warm
        engine.step()
    step = cuda_time(engine.step, steps)
    seqs = list(engine.scheduler.running)
    replay = cuda_time(graphs.graphs[1].replay, steps)
    hidden = graphs.outputs[1][:1]
    head = cuda_time(lambda: llm.model.compute_logits(hidden), steps)
    logits = llm.model.compute_logits(hidden)
    sampling = cuda_time(lambda: sample(logits.clone(), seqs), steps)
    inputs = cuda_time(lambda: graphs.run(seqs), steps) - replay
    log(f"{label}: batch-1 decode step {step * 1e3:.3f} ms ({1 / step:.1f} tok/s); graph replay alone "
        f"{replay * 1e3:.3f} ms; head {head * 1e3:.3f} ms; sampling (greedy, with the host copy) "
        f"{sampling * 1e3:.3f} ms; graph inputs staged on the host {inputs * 1e3:.3f} ms; rest of the step "
        f"(scheduler, outputs, detokenizer) {(step - replay - head - sampling - inputs) * 1e3:.3f} ms")
    if with_cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        log(f"cProfile of {steps} decode steps (own time):\n{out.getvalue()}")
    while engine.has_work():
        engine.step()
    # the same at a long context: the attention's share grows with it
    long = [{"role": "user", "content": " ".join(f"Fact {i}: the number {i * 7919 % 1000} is odd or even." for i in
                                               range(120))}]
    engine.add_request(label + " long", llm.prompt(long), SamplingParams(temperature=0, max_tokens=steps + 16,
                                                                        ignore_eos=True))
    while not engine.step():
        pass
    for _ in range(8):
        engine.step()
    context = next(iter(engine.scheduler.running)).num_tokens
    step = cuda_time(engine.step, steps)
    log(f"{label}: batch-1 decode step at a {context}-token context {step * 1e3:.3f} ms ({1 / step:.1f} tok/s)")
    while engine.has_work():
        engine.step()
    out = llm.generate([llm.prompt(text_messages(11))], SamplingParams(temperature=0, max_tokens=48,
                                                                       ignore_eos=True))
    return out[0].token_ids


def kernel_table(llm, label: str, replays: int = 20) -> None:
    """The batch-1 decode graph's kernels by GPU time (torch.profiler over `replays` replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    replay = llm.engine.runner.graphs.graphs[1].replay
    try:
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        log(f"{label}: kernels of {replays} graph replays (per replay: divide by {replays}):\n{table}")
    except Exception as e:  # the profiler is a diagnosis, not the measurement
        log(f"{label}: no kernel table ({type(e).__name__}: {e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".cache/qwen_tokenizer")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cprofile", action="store_true", help="also print the host's Python by function")
    args = ap.parse_args()
    import unittest.mock

    from qwen2vl import LLM

    folder = Path("/tmp/qwen2vl-2b-random")
    if not (folder / "config.json").is_file():
        build_checkpoint(folder, Path(args.tokenizer))  # leaves transformers' copy to the collector
        torch.cuda.empty_cache()
    log(torch.cuda.get_device_name())
    tokens = {}
    # (label, Triton layer ops, fused gate/up, one-launch k/v write, decode attention split over the context)
    variants = [("torch ops", False, False, False, True),
                ("Triton layer ops + fused gate/up + one-launch k/v write, attention unsplit", True, True, True, False),
                ("the same, attention split over the context", True, True, True, True),
                ("torch ops again", False, False, False, True)]
    for label, layer_ops, gate_up, kv_write, split in variants:
        with contextlib.ExitStack() as stack:
            if not layer_ops:  # no Triton layer ops, hence no one-launch k/v write either
                no_layer_ops = lambda name, device: None if name == "triton_layer_ops" else triton_kernels(name, device)
                stack.enter_context(unittest.mock.patch("qwen2vl.backends.cuda.triton_kernels", no_layer_ops))
            if not gate_up:
                stack.enter_context(unittest.mock.patch("qwen2vl.model.Qwen2VL.fuse_gate_up", lambda self: None))
            if not kv_write:
                stack.enter_context(unittest.mock.patch("qwen2vl.backends.cuda.CudaBackend.write_kv",
                                                        TorchBackend.write_kv))
            if not split:
                stack.enter_context(unittest.mock.patch("qwen2vl.backends.cuda.triton_decode.num_splits", lambda *a: 1))
            llm = LLM(str(folder), dtype="bfloat16", device="cuda", kv_cache_gib=1.0)
            mlp = llm.model.model.layers[0].mlp
            log(f"{label}: decoder {type(llm.model.model).__name__}, gate/up "
                f"{'fused' if mlp.gate_up_proj is not None else 'apart'}, decode graphs "
                f"{llm.engine.runner.graphs.attention if llm.engine.runner.graphs else 'none'}")
            tokens[label] = profile(llm, args.steps, label, args.cprofile and label == "torch ops")
            if layer_ops:
                kernel_table(llm, label)
            del llm, mlp
            torch.cuda.empty_cache()
    for label, *_ in variants[1:3]:
        pairs = list(zip(tokens["torch ops"], tokens[label]))
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        log(f"greedy tokens (48, one prompt): {label} agree with torch ops on {sum(a == b for a, b in pairs)}; "
            f"the first difference at {first}")

if __name__ == "__main__":
    main()
