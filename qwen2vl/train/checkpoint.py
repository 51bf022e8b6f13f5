"""What a run writes: resumable training state every N steps, and at the end the result, a PEFT adapter
(LoRA) or a full checkpoint folder that transformers and `qwen2vl` load (full).

    OUTPUT/checkpoint-STEP/   trainable.safetensors (float32 master weights), optimizer.pt (AdamW and
                              schedule), rng.pt, state.json (step and the settings that must not change);
                              a LoRA run also writes the adapter there, usable as it is
    OUTPUT/                   adapter_config.json + adapter_model.safetensors, or config.json,
                              model.safetensors and the base's tokenizer / processor / generation files
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
NOT_COPIED = {"model.safetensors.index.json", "adapter_config.json"}


def save_state(folder: Path, step: int, params: dict, optimizer, scheduler, settings: dict) -> Path:
    """Everything needed to continue exactly from after `step` (see `load_state`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: p.detach().cpu().contiguous() for name, p in params.items()},
              str(folder / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / "rng.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2) + "\n")
    return folder


def load_state(folder: Path, params: dict, optimizer, scheduler, settings: dict) -> int:
    """Restore a save_state folder into this run; returns the step it was saved after."""
    state = json.loads((folder / "state.json").read_text())
    changed = {k: (v, settings.get(k)) for k, v in state["settings"].items() if settings.get(k) != v}
    if changed:
        listed = ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"--resume {folder}: the run's settings changed ({listed}); resume with the same ones")
    saved = load_file(str(folder / "trainable.safetensors"))
    if set(saved) != set(params):
        raise ValueError(f"--resume {folder}: it holds other trained tensors than this run "
                         f"({sorted(set(saved) ^ set(params))[:5]} ...)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def latest_checkpoint(output: Path) -> Path | None:
    """The checkpoint-STEP folder of `output` with the highest step, or None."""
    found = [(int(m[1]), p) for p in output.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
             and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def save_full(model, base: Path, out: Path, dtype: torch.dtype) -> Path:
    """The whole model as a checkpoint folder in the hub layout (what transformers writes): the patch
    embedding back to its Conv3d shape, no lm_head when tied; the base's other files copied."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name == "visual.patch_embed.proj.weight":
            v = cfg.vision
            t = t.reshape(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        state[name] = t.detach().to("cpu", dtype).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    copy_side_files(base, out)
    return out


def copy_side_files(base: Path, out: Path) -> None:
    """The base folder's files other than weights: config, tokenizer, chat template, preprocessor and
    generation configs (what a checkpoint folder needs besides its tensors)."""
    for f in Path(base).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in NOT_COPIED:
            if f.resolve() != (out / f.name).resolve():
                shutil.copy(f, out / f.name)
