"""Parity and speed of our model vs transformers at the real Qwen2-VL-2B shapes (random weights; the
other random checkpoints of benchmarks/random_checkpoint.py with --model, e.g. 2.5-3b).

Prints max abs / relative logit error in float32 and bfloat16 and the vision-tower and decoder
prefill times of ours vs the reference, interleaved in one process (this VM's speed drifts).
Input: one 448x448 image (1024 patches, 256 visual tokens) in a 283-token prompt. "ours (LLM)" is
the model as `LLM` runs it on the CPU in bf16 (FastLinears); each time is also put against the
matmul-throughput bound: the part's matmul FLOPs at the bf16 GEMM probe's rate, probed in between.

    python -m benchmarks.parity [--dtypes float32,bfloat16] [--reps 3] [--model 2b|7b|2.5-3b|2.5-7b] [--layers N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

from benchmarks.bandwidth import gemm_gflops
from benchmarks.random_checkpoint import CONFIGS, random_checkpoint, reference_class
from qwen2vl import Qwen2VL
from qwen2vl.attention import causal_attend
from qwen2vl.backends.cpu.linear import speed_up_linears
from qwen2vl.positions import mrope_positions
from qwen2vl.vision_window import window_order


def make_prompt(cfg, grid=(1, 32, 32), text_before=15, text_after=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2] // 4
    text = lambda k: torch.randint(0, 151000, (k,), generator=g)
    ids = torch.cat([
        text(text_before), torch.tensor([cfg.vision_start_token_id]), torch.full((n,), cfg.image_token_id),
        torch.tensor([cfg.vision_end_token_id]), text(text_after),
    ])
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 1176, generator=g)
    return ids, pixels, torch.tensor([list(grid)])


def timed(fn, reps):
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def vision_flops(cfg, grid) -> float:
    """Matmul FLOPs of the vision tower on one image/video of grid (t, h, w): linears and attention
    (Qwen2.5-VL: a gated MLP, and windowed blocks attend within their windows)."""
    v = cfg.vision
    t, h, w = grid
    p, e = t * h * w, v.embed_dim
    mlp = (3 if v.window_size else 2) * e * v.mlp_dim
    frames = 4 * t * (h * w) ** 2 * e
    attention = [frames] * v.depth
    if v.window_size:
        _, cu = window_order(torch.tensor([grid]), v.spatial_merge_size, v.window_tokens)
        windows = 4 * sum((b - a) ** 2 for a, b in zip(cu[:-1], cu[1:])) * e
        attention = [frames if i in v.fullatt_block_indexes else windows for i in range(v.depth)]
    merged = 4 * e
    return (v.depth * 2 * p * (4 * e * e + mlp) + sum(attention) + 2 * p * v.patch_dim * e
            + 2 * (p // 4) * (merged * merged + merged * v.hidden_size))


def prefill_flops(cfg, n: int) -> float:
    """Matmul FLOPs of a prefill of n tokens: decoder linears, causal attention, the head for the last row."""
    c = cfg.text
    d, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    linears = 2 * d * d + 2 * d * kv + 3 * d * c.intermediate_size
    return c.num_hidden_layers * (2 * n * linears + 2 * n * n * d) + 2 * d * c.vocab_size


def reference_parts(hf, ids, pixels, grid, types):
    def vision():
        return hf.model.visual(pixels.to(hf.dtype), grid).pooler_output

    def decoder(embeds, pos):
        h = hf.model.language_model(inputs_embeds=embeds[None], position_ids=pos[:, None]).last_hidden_state[0]
        return hf.lm_head(h[-1:]).float()

    def full():
        return hf(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types).logits[0]

    return vision, decoder, full


def run(dtype, folder, reps, ref_logits_fp32=None):
    config = json.loads((folder / "config.json").read_text())
    hf = reference_class(config).from_pretrained(folder, dtype=dtype).eval()
    ours = Qwen2VL.from_pretrained(folder, dtype=dtype)
    cfg = ours.config
    ids, pixels, grid = make_prompt(cfg)
    types = ((ids == cfg.image_token_id).int())[None]
    pos, _ = mrope_positions(ids, grid, None, cfg)
    ref_vision, ref_decoder, ref_full = reference_parts(hf, ids, pixels, grid, types)
    with torch.inference_mode():
        got = ours.logits(ids, pixel_values=pixels, image_grid_thw=grid)
        want = ref_full().float()
        vis = ours.visual(pixels, grid)
        embeds = ours.embed(ids, vis)
        fast = None
        if dtype == torch.bfloat16:
            fast = copy.deepcopy(ours)
            speed_up_linears(fast, skip=("visual.patch_embed",))
        models = {"ours": ours, **({"ours (LLM)": fast} if fast is not None else {})}
        t = {f"{part} {who}": [] for part in ("vision", "prefill") for who in (*models, "ref")}
        gemm = []
        for _ in range(reps):  # interleave A/B: the VM's speed drifts
            for who, m in models.items():
                t[f"vision {who}"] += timed(lambda m=m: m.visual(pixels, grid), 1)[1]
            t["vision ref"] += timed(ref_vision, 1)[1]
            for who, m in models.items():
                t[f"prefill {who}"] += timed(lambda m=m: m.compute_logits(m(embeds, pos, causal_attend)[-1:]), 1)[1]
            t["prefill ref"] += timed(lambda: ref_decoder(embeds, pos), 1)[1]
            gemm.append(gemm_gflops(3) if dtype == torch.bfloat16 else float("nan"))
    err = (got - want).abs().max().item()
    rel = err / want.abs().max().item()
    print(f"[{dtype}] logits vs reference in the same dtype: max abs {err:.3e}, max rel {rel:.3e}; "
          f"argmax agreement {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.4f}")
    if ref_logits_fp32 is not None:
        scale = ref_logits_fp32.abs().max().item()
        for who, logits in (("ours", got), ("reference", want)):
            e32 = (logits - ref_logits_fp32).abs().max().item()
            agree = (logits.argmax(-1) == ref_logits_fp32.argmax(-1)).float().mean().item()
            print(f"[{dtype}] {who} vs float32 reference: max abs {e32:.3e}, max rel {e32 / scale:.3e}, "
                  f"argmax agreement {agree:.4f}")
    med = {k: statistics.median(v) for k, v in t.items()}
    rate = statistics.median(gemm) * 1e9
    flops = {"vision": vision_flops(cfg, tuple(grid[0].tolist())), "prefill": prefill_flops(cfg, len(ids))}
    if dtype == torch.bfloat16:
        print(f"[{dtype}] bf16 GEMM probe {rate / 1e9:.0f} GFLOP/s (median; {[round(g) for g in gemm]}); "
              f"vision {flops['vision'] / 1e12:.2f} TFLOP, prefill {flops['prefill'] / 1e12:.2f} TFLOP")
    for part in ("vision", "prefill"):
        r = med[f"{part} ref"]
        for who in models:
            o = med[f"{part} {who}"]
            bound = f"  {o * rate / flops[part]:4.2f}x the matmul bound" if dtype == torch.bfloat16 else ""
            print(f"[{dtype}] {part:8s} {who:11s} {o:6.3f} s  ref {r:6.3f} s  ratio ours/ref {o / r:5.2f}{bound}  "
                  f"(runs {[round(x, 2) for x in t[f'{part} {who}']]}, ref {[round(x, 2) for x in t[f'{part} ref']]})")
        if dtype == torch.bfloat16:
            print(f"[{dtype}] {part:8s} reference at {r * rate / flops[part]:4.2f}x the matmul bound")
    return want


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="2b", choices=list(CONFIGS))
    ap.add_argument("--layers", type=int, help="this many decoder and vision layers (a quick run at real widths)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    folder = random_checkpoint(args.model, layers=args.layers)
    print(f"checkpoint {folder}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"prompt 283 tokens with one 448x448 image (1024 patches, 256 visual tokens)")
    ref32 = None
    for name in args.dtypes.split(","):
        want = run(getattr(torch, name), folder, args.reps, ref32)
        if name == "float32":
            ref32 = want
        gc.collect()


if __name__ == "__main__":
    main()
