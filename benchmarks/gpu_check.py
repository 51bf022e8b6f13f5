"""One prepared GPU run: parity and speed of ours vs transformers at the real 2B shapes (random weights).

Builds the random 2B checkpoint on the GPU machine (weights can't travel), then prints:
- logits parity, bf16 and fp32, ours vs transformers on the same checkpoint;
- vision-tower and prefill times, ours vs transformers;
- engine: time to first token with a 448x448 image (both sides timed from the messages, image
  preprocessing included), batch-1 decode tok/s (with decode CUDA graphs and with
  enforce_eager=True), and aggregate tok/s with 32 and 64 concurrent requests, next to
  transformers `generate` in the same run.

    python -m benchmarks.gpu_check --tokenizer .cache/qwen_tokenizer [--budget 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from benchmarks.parity import make_prompt
from benchmarks.random_checkpoint import CONFIG_2B, PREPROCESSOR

T0 = time.time()
DEV = "cuda"
CONFIG = dict(CONFIG_2B)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def cuda_time(fn, reps=5):
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_checkpoint(folder: Path, tokenizer: Path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(DEV):
        hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**CONFIG)).to(torch.bfloat16).eval()
    hf.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    for f in tokenizer.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return hf


def parity(hf, folder):
    from qwen2vl import Qwen2VL
    from qwen2vl.attention import causal_attend
    from qwen2vl.positions import mrope_positions

    ours = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16, device=DEV)
    cfg = ours.config
    ids, pixels, grid = make_prompt(cfg)
    ids, pixels, grid = ids.to(DEV), pixels.to(DEV), grid.to(DEV)
    types = (ids == cfg.image_token_id).int()[None]
    with torch.inference_mode():
        ref = lambda m: m(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid,
                          mm_token_type_ids=types).logits[0].float()
        want16, got16 = ref(hf), ours.logits(ids, pixel_values=pixels, image_grid_thw=grid.cpu())
        pos, _ = mrope_positions(ids.cpu(), grid.cpu(), None, cfg)
        pos = pos.to(DEV)
        embeds = ours.embed(ids, ours.visual(pixels, grid.cpu()))
        t = {
            "vision ours": cuda_time(lambda: ours.visual(pixels, grid.cpu())),
            "vision ref": cuda_time(lambda: hf.model.visual(pixels.to(hf.dtype), grid)),
            "prefill ours": cuda_time(lambda: ours.compute_logits(ours(embeds, pos, causal_attend)[-1:])),
            "prefill ref": cuda_time(lambda: hf.lm_head(hf.model.language_model(
                inputs_embeds=embeds[None], position_ids=pos[:, None]).last_hidden_state[0, -1:])),
        }
        ours = None  # free before the fp32 copy
        torch.cuda.empty_cache() if DEV == "cuda" else None
        hf.float()
        from qwen2vl import Qwen2VL as Q

        ours32 = Q.from_pretrained(folder, dtype=torch.float32, device=DEV)
        want32, got32 = ref(hf), ours32.logits(ids, pixel_values=pixels, image_grid_thw=grid.cpu())
        ours32 = None
        hf.to(torch.bfloat16)
        torch.cuda.empty_cache() if DEV == "cuda" else None
    for name, got, want in (("float32", got32, want32), ("bfloat16", got16, want16)):
        err = (got - want).abs().max().item()
        log(f"parity {name}: ours vs transformers max abs {err:.3e}, max rel {err / want.abs().max().item():.3e}, "
            f"argmax agreement {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.4f}")
    for who, logits in (("ours", got16), ("transformers", want16)):
        err = (logits - want32).abs().max().item()
        log(f"parity bf16 {who} vs fp32 transformers: max abs {err:.3e}, rel {err / want32.abs().max().item():.3e}")
    for part in ("vision", "prefill"):
        o, r = t[f"{part} ours"], t[f"{part} ref"]
        log(f"{part} (283-token prompt, 1024 patches) bf16: ours {o * 1e3:.1f} ms, transformers {r * 1e3:.1f} ms, "
            f"ours/ref {o / r:.2f}")


def image_messages():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (448, 448, 3), generator=g, dtype=torch.uint8).numpy())
    return [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What is in this image?"}]}]


def fresh_image(seed):
    """image_messages with the picture rotated by `seed` degrees: new pixels, so no cache hit."""
    m = image_messages()
    m[0]["content"][0]["image"] = m[0]["content"][0]["image"].rotate(seed)
    return m


def text_messages(i):
    return [{"role": "user", "content": f"Request {i}: write a long story about the number {i * 7919 % 1000}."}]


def reference_generate(hf, processor, messages_list, new_tokens, with_processing=False):
    """transformers generate, left-padded batch; returns wall seconds (from the messages, image
    preprocessing included, when `with_processing`: what our TTFT measures)."""
    sync()
    t = time.perf_counter()
    batch = [processor(m, add_generation_prompt=True) for m in messages_list]
    width = max(len(b["input_ids"]) for b in batch)
    pad = 151643
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros_like(ids)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[r, width - n:] = b["input_ids"]
        mask[r, width - n:] = 1
    kw = dict(input_ids=ids.to(DEV), attention_mask=mask.to(DEV))
    if batch[0]["pixel_values"] is not None:
        kw.update(pixel_values=torch.cat([b["pixel_values"] for b in batch]).to(DEV),
                  image_grid_thw=torch.cat([b["image_grid_thw"] for b in batch]).to(DEV),
                  mm_token_type_ids=(ids == 151655).int().to(DEV))
    sync()
    if not with_processing:
        t = time.perf_counter()
    hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync()
    return time.perf_counter() - t


def decode_rate(llm, n_dec: int, seed: int = 0) -> float:
    """Batch-1 decode tok/s from stream timestamps: tokens after the first over the time they took.

    (Subtracting a separate 1-token run's time is wrong here: that run hits the prefix cache.)
    """
    from qwen2vl import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_dec, ignore_eos=True)
    stamps, count = [], 0
    for chunk in llm.stream(text_messages(1000 + seed), params):
        count += len(chunk.token_ids)
        stamps.append((time.perf_counter(), count))
    (t0, c0), (t1, c1) = stamps[0], stamps[-1]
    assert c1 == n_dec, f"expected {n_dec} tokens, got {c1}"
    return (c1 - c0) / (t1 - t0)


def engine_and_reference(hf, folder, budget):
    from qwen2vl import LLM, SamplingParams

    llm = LLM(str(folder), dtype="bfloat16", device=DEV, gpu_memory_utilization=0.6,
              kv_cache_gib=None if DEV == "cuda" else 0.5)
    one = SamplingParams(temperature=0, max_tokens=1)
    n_dec = 128
    dec = SamplingParams(temperature=0, max_tokens=n_dec, ignore_eos=True)
    img = image_messages()
    llm.chat(img, one)  # warm-up (vision cache is keyed by content: use fresh images below)

    ttft = []
    for s in range(1, 4):
        t = time.perf_counter()
        llm.chat(fresh_image(s), one)
        ttft.append(time.perf_counter() - t)
    prep = []
    for s in range(4, 7):
        t = time.perf_counter()
        llm.prompt(fresh_image(s))
        prep.append(time.perf_counter() - t)
    decodes = [decode_rate(llm, n_dec, seed) for seed in range(3)]
    ours_dec = statistics.median(decodes)
    graphs = llm.engine.runner.graphs
    log(f"ours: TTFT image 448x448 {statistics.median(ttft) * 1e3:.1f} ms (runs {[round(x * 1e3) for x in ttft]}; "
        f"of which messages -> prompt on the host {statistics.median(prep) * 1e3:.1f} ms); "
        f"batch-1 decode {ours_dec:.1f} tok/s (runs {[round(r, 1) for r in decodes]}); decode graphs: "
        + (f"{graphs.attention} attention, buckets {graphs.buckets}, {graphs.num_replays} replays so far"
           if graphs else "none (eager)"))
    profile_ttft(llm, fresh_image(7), one)
    eager = LLM(str(folder), dtype="bfloat16", device=DEV, kv_cache_gib=1.0, enforce_eager=True)
    eager.chat(text_messages(1), one)  # warm-up, as the graphed engine had
    eager_decs = [decode_rate(eager, n_dec, seed) for seed in range(3)]
    eager_dec = statistics.median(eager_decs)
    del eager
    torch.cuda.empty_cache() if DEV == "cuda" else None
    log(f"ours enforce_eager=True: batch-1 decode {eager_dec:.1f} tok/s (runs {[round(r, 1) for r in eager_decs]}); "
        f"graphs/eager {ours_dec / eager_dec:.2f}x")
    ref_ttft = [reference_generate(hf, llm.processor, [fresh_image(s)], 1, with_processing=True)
                for s in range(1, 4)]
    ref_total = reference_generate(hf, llm.processor, [text_messages(0)], n_dec)
    ref_first = reference_generate(hf, llm.processor, [text_messages(0)], 1)
    ref_dec = (n_dec - 1) / (ref_total - ref_first)
    log(f"transformers: TTFT image {statistics.median(ref_ttft) * 1e3:.1f} ms (preprocessing included); "
        f"batch-1 decode {ref_dec:.1f} tok/s; "
        f"ratios ours/ref: TTFT {statistics.median(ttft) / statistics.median(ref_ttft):.2f}, "
        f"decode {ours_dec / ref_dec:.2f}x")
    for n in (32, 64):
        if time.time() - T0 > budget:
            log(f"skipping {n} concurrent: over the time budget")
            break
        convs = [text_messages(i) for i in range(n)]
        t = time.perf_counter()
        outs = llm.chat(convs, dec)
        wall = time.perf_counter() - t
        ours_tp = sum(len(o.token_ids) for o in outs) / wall
        ref_wall = reference_generate(hf, llm.processor, convs, n_dec)
        ref_tp = n * n_dec / ref_wall
        log(f"{n} concurrent x {n_dec} tokens: ours {ours_tp:.0f} tok/s ({wall:.1f} s), transformers "
            f"{ref_tp:.0f} tok/s ({ref_wall:.1f} s), ours/ref {ours_tp / ref_tp:.2f}x")


def profile_ttft(llm, messages, params, top=18):
    """Where one image request's time to first token goes on the host (cProfile, cumulative)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    llm.chat(messages, params)
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    log("cProfile of one image TTFT (cumulative):\n" + out.getvalue())


def decode_only(folder):
    from qwen2vl import LLM

    for eager in (False, True):
        llm = LLM(str(folder), dtype="bfloat16", device=DEV, kv_cache_gib=1.0, enforce_eager=eager)
        rates = [decode_rate(llm, 128, seed) for seed in range(3)]
        log(f"ours {'eager' if eager else 'graphs'}: batch-1 decode tok/s {[round(r, 1) for r in rates]} "
            f"(3 prompts, stream timestamps)")
        del llm
        torch.cuda.empty_cache() if DEV == "cuda" else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".cache/qwen_tokenizer")
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--decode-only", action="store_true", help="only ours' batch-1 decode, graphs vs eager")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script on a tiny config")
    args = ap.parse_args()
    import transformers

    global DEV
    if args.tiny:
        DEV = "cpu"
        CONFIG.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                      vision_config={**CONFIG["vision_config"], "depth": 1, "embed_dim": 32, "num_heads": 2,
                                     "hidden_size": 64})
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    log(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}")
    folder = Path("/tmp/qwen2vl-2b-random" + ("-tiny" if args.tiny else ""))
    hf = build_checkpoint(folder, Path(args.tokenizer))
    hf.config._attn_implementation = "sdpa"
    log("checkpoint built")
    if args.decode_only:
        return decode_only(folder)
    parity(hf, folder)
    engine_and_reference(hf, folder, args.budget)
    log("done")


if __name__ == "__main__":
    main()
