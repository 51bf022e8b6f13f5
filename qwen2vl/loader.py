"""All checkpoint surgery in one place: files, name layouts, Conv3d-as-Linear, tied head, dtypes.

The model is built on the meta device and each tensor is read (memory-mapped) from safetensors,
converted once to the target dtype/device and put in place, so peak memory is about one copy of
the weights in the target dtype. Anything missing, unexpected or mis-shaped is an error naming it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

# transformers 5 keeps these in-memory names on disk too; map them to the hub layout we use
_NAME_RULES = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
]


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the index names shards that are missing: {missing}")
    return files


def canonical_name(name: str) -> str:
    for pattern, repl in _NAME_RULES:
        name = pattern.sub(repl, name)
    return name


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def load_weights(model: nn.Module, folder: Path, dtype: torch.dtype, device, tied_head: bool) -> None:
    """Fill a meta-device `model` from the checkpoint in `folder`, in place."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    if tied_head:
        expected.pop("lm_head.weight", None)
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for disk_name in f.keys():
                name = canonical_name(disk_name)
                if tied_head and name == "lm_head.weight":
                    continue  # some tied checkpoints still carry a copy; the embedding is the truth
                if name not in expected:
                    unexpected.append(disk_name)
                    continue
                if name in seen:
                    raise ValueError(f"{folder}: tensor {name} appears twice (as {disk_name})")
                tensor = f.get_tensor(disk_name)
                want = expected[name].shape
                if name == "visual.patch_embed.proj.weight" and tensor.dim() == 5:
                    tensor = tensor.reshape(tensor.shape[0], -1)  # Conv3d (E, C, T, P, P) -> Linear (E, C*T*P*P)
                if tensor.shape != want:
                    raise ValueError(
                        f"{folder}: tensor {disk_name} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
                    )
                placed = tensor.to(device=device, dtype=dtype)
                if placed.data_ptr() == tensor.data_ptr():
                    # same dtype on the CPU: still a view of the file's mapped pages, which the OS
                    # may evict under memory pressure and re-read mid-generation; own the memory
                    placed = placed.clone()
                _set_tensor(model, name, placed)
                seen.add(name)
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors in checkpoint: {unexpected[:10]} ({len(unexpected)} in all)")
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{folder}: tensors missing from checkpoint: {missing[:10]} ({len(missing)} in all)")
    if tied_head:
        model.lm_head.weight = model.model.embed_tokens.weight


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint declares (bf16 for the published ones)."""
    cfg = json.loads((folder / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
