"""The engine next to transformers `generate`, on the real Qwen2-VL-2B shapes (random weights, CPU;
`--model 2.5-3b` etc. for the other random checkpoints of benchmarks/random_checkpoint.py).

Measured in one process, engine and reference interleaved (this VM's speed drifts):
- single stream: time to first token for a 448x448 image + question (283 prompt tokens), and
  decode tokens/s over the following tokens;
- the engine's decode-phase throughput with 1 and 16 requests running together (steps in which
  every request is decoding; prefill excluded), and the single stream against the
  memory-bandwidth bound (bytes of weights a decode step streams / the read probe, probed right
  after);
- aggregate tokens/s with 1, 4 and 16 requests submitted together, each with its own picture
  (so neither the vision cache nor the prefix cache helps), prefill included; transformers gets
  the same requests as one left-padded batch.
Random weights never emit eos sensibly, so both sides generate exactly max tokens (ignore_eos /
min_new_tokens). A bandwidth/GEMM probe is printed before and after.

    python -m benchmarks.engine_cpu                   # builds/reuses .cache/qwen2vl-2b-random
    python -m benchmarks.engine_cpu --model DIR --concurrency 1 4 --agg-tokens 16
    python -m benchmarks.engine_cpu --model 2.5-3b    # Qwen2.5-VL-3B shapes (--layers 2: a quick run)
    python -m benchmarks.engine_cpu --reps 3 --concurrency --decode-batches 1 16   # no aggregates
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bandwidth import probe, probed
from benchmarks.random_checkpoint import CONFIGS, random_checkpoint, reference_class
from qwen2vl import LLM, SamplingParams


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8))


def conversation(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": picture(seed)},
                                         {"type": "text", "text": "What is in this image?"}]}]


def engine_single(llm: LLM, seed: int, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of one request streamed alone."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    stamps = []
    for chunk in llm.stream(conversation(seed), params):
        stamps += [time.perf_counter()] * len(chunk.token_ids)
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engine_batch(llm: LLM, seeds: list[int], tokens: int) -> float:
    """Aggregate generated tokens/s for requests submitted together (processing included)."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.chat([conversation(s) for s in seeds], params)
    assert all(len(o.token_ids) == tokens for o in outs)
    return len(seeds) * tokens / (time.perf_counter() - start)


def engine_decode_rate(llm: LLM, seeds: list[int], steps: int) -> float:
    """Generated tokens/s over `steps` engine steps in which all len(seeds) requests decode."""
    # enough tokens that the first requests, decoding while the last ones prefill (a step's token budget
    # takes ~7 prompts of 283 tokens), are still running after `steps`; the rest are aborted
    params = SamplingParams(temperature=0, max_tokens=steps + 4 + len(seeds), ignore_eos=True)
    for s in seeds:
        llm.engine.add_request(f"decode-{s}", llm.prompt(conversation(s)), params)
    while len(llm.engine.step()) < len(seeds):  # vision, prefill and the first token of each
        pass
    start = time.perf_counter()
    for _ in range(steps):
        assert len(llm.engine.step()) == len(seeds)
    elapsed = time.perf_counter() - start
    for s in seeds:
        llm.engine.abort(f"decode-{s}")
    while llm.engine.has_work():
        llm.engine.step()
    return len(seeds) * steps / elapsed


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step streams: every decoder linear and the head (bf16)."""
    cfg = model.config.text
    d, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * i
    return 2 * (cfg.num_hidden_layers * per_layer + cfg.vocab_size * d)


def own_weights(model: torch.nn.Module) -> None:
    """Copy weights into process memory. Both loaders map the safetensors files; with two 2B
    models and other processes on a 24 GB box, mapped pages get evicted and re-read from disk
    mid-run, which times the disk rather than the model (seen as 5-10x slower runs)."""
    copies = {}
    with torch.no_grad():
        for p in model.parameters():
            key = p.data.data_ptr()
            if key not in copies:
                copies[key] = p.data.clone()
            p.data = copies[key]


class Reference:
    """transformers generate on the same checkpoint and the same processor output."""

    def __init__(self, folder, processor, dtype: torch.dtype = torch.bfloat16):
        config = json.loads((Path(folder) / "config.json").read_text())
        self.model = reference_class(config).from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        own_weights(self.model)
        self.processor = processor
        self.pad = processor.tokenizer.pad_token_id or 0

    def inputs(self, seeds: list[int]) -> dict:
        batch = [self.processor(conversation(s), add_generation_prompt=True) for s in seeds]
        width = max(b["input_ids"].numel() for b in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, b in enumerate(batch):  # left padding, as generate wants
            n = b["input_ids"].numel()
            ids[i, width - n:], mask[i, width - n:] = b["input_ids"], 1
        image_id = self.model.config.image_token_id
        return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_id).long(),
                    pixel_values=torch.cat([b["pixel_values"] for b in batch]),
                    image_grid_thw=torch.cat([b["image_grid_thw"] for b in batch]))

    def generate(self, seeds: list[int], tokens: int) -> list[float]:
        """Timestamps of each generation step, the first taken before processing."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps = [time.perf_counter()]

        class Clock(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        inputs = self.inputs(seeds)
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=self.pad, stopping_criteria=StoppingCriteriaList([Clock()]))
        return stamps

    def single(self, seed: int, tokens: int) -> tuple[float, float]:
        s = self.generate([seed], tokens)
        return s[1] - s[0], (len(s) - 2) / (s[-1] - s[1])

    def batch(self, seeds: list[int], tokens: int) -> float:
        s = self.generate(seeds, tokens)
        return len(seeds) * tokens / (s[-1] - s[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder, or a random checkpoint built if missing: "
                    f"{', '.join(CONFIGS)} (default 2b)")
    ap.add_argument("--layers", type=int, help="random checkpoints: this many decoder and vision layers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per single-stream run")
    ap.add_argument("--reps", type=int, default=2, help="single-stream repetitions (each side)")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--agg-tokens", type=int, default=32, help="tokens per request in the aggregate runs")
    ap.add_argument("--agg-reps", type=int, default=2, help="aggregate repetitions (each side)")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16],
                    help="requests decoding together for the decode-phase throughput")
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model and args.model not in CONFIGS:
        folder = args.model
    else:
        from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

        folder = random_checkpoint(args.model or "2b", tokenizer_dir=qwen_tokenizer_dir(), layers=args.layers)
    print(f"model {folder}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("probe before:", probe())
    llm = LLM(str(folder), dtype="bfloat16", device="cpu", kv_cache_gib=args.kv_cache_gib)
    own_weights(llm.model)
    ref = Reference(folder, llm.processor)
    n_prompt = len(llm.prompt(conversation(0)))
    print(f"prompt: 448x448 image + question = {n_prompt} tokens")

    seed = iter(range(1000, 100000))  # a fresh picture every run: no cache hits anywhere
    engine_single(llm, next(seed), 4)  # warm-up both sides
    ref.single(next(seed), 4)
    rows = {"engine": [], "transformers": []}
    for _ in range(args.reps):
        rows["engine"].append(engine_single(llm, next(seed), args.tokens))
        rows["transformers"].append(ref.single(next(seed), args.tokens))
    print(f"\nsingle stream, {args.tokens} tokens, median of {args.reps} (all runs in brackets)")
    print(f"{'':14}{'TTFT s':>10}{'decode tok/s':>16}")
    for name, r in rows.items():
        ttft, tps = [x[0] for x in r], [x[1] for x in r]
        print(f"{name:14}{statistics.median(ttft):10.2f}{statistics.median(tps):16.2f}"
              f"   [{', '.join(f'{x:.2f}' for x in ttft)}] [{', '.join(f'{x:.2f}' for x in tps)}]")

    if args.decode_batches:
        print(f"\nengine decode phase, {args.decode_steps} steps with every request decoding "
              f"(median of {args.reps}; all runs in brackets, with the read probe around each)")
        # the batches take turns within each repetition, and each run is bracketed by probes: the
        # memory speed drifts between phases minutes apart, so ratios pair runs of one repetition
        rates = {k: [] for k in args.decode_batches}
        reads = {k: [] for k in args.decode_batches}
        for _ in range(args.reps):
            for k in args.decode_batches:
                seeds = [next(seed) for _ in range(k)]
                rate, before, after = probed(engine_decode_rate, llm, seeds, args.decode_steps)
                rates[k].append(rate)
                reads[k].append((before + after) / 2)
        for k in args.decode_batches:
            ratio = ""
            if 1 in rates and k != 1:
                paired = [a / b for a, b in zip(rates[k], rates[1])]
                ratio = (f", {statistics.median(rates[k]) / statistics.median(rates[1]):.1f}x one stream "
                         f"(paired per repetition: median {statistics.median(paired):.1f}x; "
                         f"{', '.join(f'{x:.1f}x' for x in paired)})")
            print(f"{k:4d} requests: {statistics.median(rates[k]):7.2f} tok/s{ratio}   "
                  f"[{', '.join(f'{x:.2f} at {r:.0f} GB/s' for x, r in zip(rates[k], reads[k]))}]", flush=True)
        if 1 in rates:
            of_bound = [rate / (read * 1e9 / step_bytes(llm.model)) for rate, read in zip(rates[1], reads[1])]
            print(f"bandwidth bound: {step_bytes(llm.model) / 1e9:.2f} GB of weights per step at the read probe "
                  f"(1 GiB sum, probed before and after each run); one stream decodes at "
                  f"{statistics.median(of_bound):.0%} of it (median; runs "
                  f"{', '.join(f'{f:.0%} at {r:.0f} GB/s' for f, r in zip(of_bound, reads[1]))})")

    print(f"\naggregate generated tokens/s, {args.agg_tokens} tokens per request, wall clock incl. prefill, "
          f"median of {args.agg_reps} (the side that goes first alternates; all runs in brackets)")
    print(f"{'requests':>8}{'engine':>10}{'transformers':>14}{'ratio':>8}")
    for k in args.concurrency:
        e, t = [], []
        for rep in range(args.agg_reps):
            sides = [(e, engine_batch, llm), (t, Reference.batch, ref)]
            for out, run, obj in sides[:: 1 if rep % 2 == 0 else -1]:
                out.append(run(obj, [next(seed) for _ in range(k)], args.agg_tokens))
        me, mt = statistics.median(e), statistics.median(t)
        print(f"{k:8d}{me:10.2f}{mt:14.2f}{me / mt:8.2f}   [{', '.join(f'{x:.2f}' for x in e)}] "
              f"[{', '.join(f'{x:.2f}' for x in t)}]", flush=True)
    print("\nprobe after:", probe())
    print("engine stats:", llm.engine.stats())


if __name__ == "__main__":
    main()
