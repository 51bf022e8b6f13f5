"""A checkpoint with new decoder layers beside its own, each starting as the identity.

    python -m qwen2vl.demo.grow BASE OUT [--layers 2] [--below] [--seed 0]

writes BASE with `--layers` more decoder layers after its last (`--below`: before its first, its own
renumbered; config.json's `num_hidden_layers` raised), each initialised as transformers initialises a layer
(normal(0, initializer_range) weights, zero biases, unit norms) except its attention's `o_proj` and its MLP's
`down_proj`, which start at zero: a layer whose two branches add nothing to the residual, so OUT answers
exactly as BASE does until it is trained (`qwen2vl train --full --train-layers 4,5` trains them alone).

Why (docs/demo.md, "K7 on, a tower taught on, and new layers around J2's decoder"): the demo's decoder, which
answers the suite's other tasks, learns no reading when taught it, and new decoders that read learn the
other tasks slowly; new layers trained alone might learn as a new decoder does while the layers around them
keep every answer. Measured there: on top of the demo's decoder they learnt no reading in 500 steps of
strips, below it a little.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.hub import resolve_model_path
from qwen2vl.model import Qwen2VL
from qwen2vl.train.checkpoint import save_full
from qwen2vl.train.setup import initialise, initializer_range, tie_head


def grow(base: Path, out: Path, layers: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
         below: bool = False) -> Path:
    """BASE with `layers` identity-initialised decoder layers after its own (`below`: before them, the base's
    renumbered), saved to OUT in `dtype` (the demo ships bf16)."""
    old = Qwen2VL.from_pretrained(base, dtype=torch.float32, device="cpu")
    first = old.config.text.num_hidden_layers
    raw = json.loads((base / "config.json").read_text())
    for text in (raw, raw.get("text_config") or {}):  # the hub's flat layout, or transformers 5's text_config
        for key in ("num_hidden_layers", "max_window_layers"):  # no sliding window in any layer, as in the base
            if key in text:
                text[key] = first + layers
    model = Qwen2VL(Qwen2VLConfig.from_dict(raw))  # on the CPU, float32
    torch.manual_seed(seed)
    new, std = (range(layers) if below else range(first, first + layers)), initializer_range(base)
    for layer in (model.model.layers[i] for i in new):
        initialise(layer, std)
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    state = old.state_dict()
    if below:
        state = {_shifted(name, layers): t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(tuple(f"model.layers.{i}." for i in new)) for k in missing), (
        missing, unexpected)
    tie_head(model)
    save_full(model, base, out, dtype)  # copies BASE's side files, its config.json among them: replaced below
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def _shifted(name: str, by: int) -> str:
    """'model.layers.3.mlp...' -> 'model.layers.{3 + by}.mlp...'; other names as they are."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts[2] = str(int(parts[2]) + by)
    return ".".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.demo.grow", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="checkpoint folder (or 'demo')")
    p.add_argument("out", type=Path, help="folder for the grown checkpoint")
    p.add_argument("--layers", type=int, default=2, help="new decoder layers (default 2)")
    p.add_argument("--below", action="store_true", help="the new layers before the base's (which read what they "
                   "add), not after")
    p.add_argument("--seed", type=int, default=0, help="the new layers' initialisation")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error(f"--layers must be at least 1, got {args.layers}")
    grow(Path(resolve_model_path(args.base)), args.out, args.layers, args.seed, below=args.below)
    print(f"wrote {args.out}: {args.layers} new decoder layers {'before' if args.below else 'after'} the base's")


if __name__ == "__main__":
    main()
