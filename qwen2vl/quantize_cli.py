"""`qwen2vl quantize MODEL --method int8|int8-g128|int4|int4-g64|int4-g128 --output DIR`: a quantized checkpoint
in GPTQ's own format, which we (gptq.py, backends/repack.py) and other GPTQ loaders read without
quantizing again.

The decoder's linears are quantized round-to-nearest, as `LLM(quantization=...)` does at load, but
with what GPTQ stores: fp16 scales and integer zero points. int8 is our symmetric per-row int8 as
it is (codes q + 128, one group per row, zero 128), int8-g128 the same per group of 128 (as Qwen's
GPTQ-Int8 checkpoints); int4 puts the zero point on an integer level
(GPTQ's asymmetric grid, the range stretched to hold 0) where our in-memory int4 keeps a float zero,
so its codes differ a little from `--quantization int4`'s. Everything else (embeddings, norms,
lm_head, the vision tower) is copied as it is, as in Qwen's published GPTQ checkpoints.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from qwen2vl.gptq import IntWeight, pack_gptq
from qwen2vl.hub import DEMO_MODEL
from qwen2vl.loader import canonical_name, checkpoint_files, read_tensors

METHODS = {"int8": (8, -1), "int8-g128": (8, 128), "int4": (4, 32), "int4-g64": (4, 64),
           "int4-g128": (4, 128)}  # (bits, group)
# the decoder's linears, by their hub names (`model.layers.N.self_attn.q_proj.weight`)
QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int) -> IntWeight:
    """Round-to-nearest codes of w [N, K] with fp16 scales and integer zeros (group -1: one per row)."""
    n, k = w.shape
    group = k if group_size == -1 else group_size
    if k % group:
        raise ValueError(f"groups of {group} don't tile in_features={k}")
    wg = w.float().view(n, k // group, group)
    if bits == 8:  # symmetric: |w| max -> 127, zero on code 128
        scales = (wg.abs().amax(-1) / 127).clamp(min=2**-24).half().float()
        zeros = torch.full_like(scales, 128)
    else:  # GPTQ's grid: [min(w, 0), max(w, 0)] over the 16 levels, the zero on a level
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scales = (hi - lo) / 15
        # zero points stay in 1..15: v1 files store zero - 1, and readers that add the 1 back per value
        # (exllama's) rather than per word (gptqmodel's) would read a zero of 0 wrong; a group that
        # would have one (no weight below -scale / 2) gets one level less above it instead
        low = torch.round(-lo / scales.clamp(min=2**-24)) == 0
        scales = torch.where(low, hi / 14, scales).clamp(min=2**-24).half().float()
        zeros = torch.round(-lo / scales).clamp(1, 15)
    codes = torch.round(wg / scales[..., None]) + zeros[..., None]
    codes = codes.clamp(0, 2**bits - 1).to(torch.uint8).view(n, k)
    return IntWeight(codes, zeros.to(torch.int16), scales, group, bits)


def quantize_checkpoint(src: Path, out: Path, method: str) -> int:
    """Write `src` quantized by `method` to `out` in GPTQ's format; returns how many linears it quantized."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    bits, group = METHODS[method]
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{src} is quantized already ({config['quantization_config'].get('quant_method')})")
    if out.resolve() == src.resolve():
        raise ValueError("--output must be another folder than the model's")
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    count, weight_map = 0, {}
    for file in checkpoint_files(src):
        tensors = {}
        for disk_name, read in read_tensors(file):
            if not QUANTIZED.match(canonical_name(disk_name)):
                tensors[disk_name] = read()
                continue
            module = disk_name.removesuffix(".weight")
            for field, t in pack_gptq(quantize_weight(read(), bits, group)).items():
                tensors[f"{module}.{field}"] = t
            count += 1
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    if count == 0:
        raise ValueError(f"{src}: no decoder linears (model.layers.N.*_proj.weight) to quantize")
    if (src / "model.safetensors.index.json").is_file():
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in src.iterdir():  # tokenizer, preprocessor, chat template, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": bits == 8,
        "checkpoint_format": "gptq", "meta": {"quantizer": ["qwen2vl quantize (round to nearest)"]},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return count


def add_quantize_arguments(parser) -> None:
    parser.add_argument("model", help=f"checkpoint folder (bf16/fp16/fp32 safetensors) or {DEMO_MODEL!r}")
    parser.add_argument("--method", required=True, choices=list(METHODS),
                        help="int8: one scale per row (int8-g128: per group of 128); int4: groups of 32 (int4-g64, "
                        "int4-g128: of 64, 128)")
    parser.add_argument("--output", required=True, help="folder to write the GPTQ checkpoint to")


def run_quantize(args) -> int:
    src = Path(args.model).expanduser()
    if args.model == DEMO_MODEL:
        from qwen2vl.hub import resolve_model_path

        src = Path(resolve_model_path(args.model))
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json; pass a checkpoint folder")
    count = quantize_checkpoint(src, Path(args.output).expanduser(), args.method)
    print(f"{count} linears quantized ({args.method}, GPTQ format) -> {args.output}")
    return 0


def describe(config: dict, tensors: dict[str, dict]) -> tuple[list[str], int, int]:
    """For `qwen2vl info` on a GPTQ/AWQ checkpoint, from its headers: (lines to print, the weights its
    quantized linears stand for, the bytes they take once repacked for our kernels)."""
    from math import prod

    from qwen2vl.backends.repack import INT4_GROUPS
    from qwen2vl.gptq import QuantConfig

    q = QuantConfig.parse(config["quantization_config"])
    per_word = 32 // q.bits
    linears = weights = loaded = fallback = 0
    for name, t in tensors.items():
        if not name.endswith(".qweight"):
            continue
        n = prod(t["shape"]) * per_word
        groups, rows = tensors[name.removesuffix("qweight") + "scales"]["shape"]  # [G, N]
        group, sub = n // rows // groups, next((g for g in INT4_GROUPS if (n // rows // groups) % g == 0), None)
        linears, weights = linears + 1, weights + n
        if q.bits == 4 and sub is not None:  # codes, float32 scale and zero per sub-group (repack.py)
            loaded += n // 2 + 8 * rows * groups * (group // sub)
        elif q.bits == 8 and groups == 1 and config["quantization_config"].get("sym", True):
            loaded += n + 4 * rows  # Int8Linear (the zeros, read at load, must all be 128)
        elif q.bits == 8 and sub is not None:  # Int8GroupLinear: codes, float32 scale and zero per sub-group
            loaded += n + 8 * rows * groups * (group // sub)
        else:
            loaded, fallback = loaded + 2 * n, fallback + 1
    act_order = any(name.endswith(".g_idx") for name in tensors) and config["quantization_config"].get("desc_act")
    group = "one per row" if q.group_size == -1 else f"of {q.group_size}"
    lines = [f"quantized   {q.method} {q.bits}-bit, groups {group}"
             f"{', v1 zero points' if q.v1_zeros else ''}{', act-order' if act_order else ''}: "
             f"{linears} linears, {weights:,} weights"]
    if fallback:
        lines.append(f"            {fallback} of them have no int kernel here (groups not a multiple of 32): "
                     "dequantized to 16-bit at load")
    return lines, weights, loaded
