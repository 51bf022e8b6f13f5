"""`qwen2vl merge BASE ADAPTER OUT`: a LoRA adapter folded into a full checkpoint, W' = W + scale * B A.

Works on the checkpoint's tensors directly (no model built): every file of BASE is read, the adapted
weights are updated in float32 and rounded back to their stored dtype, and the files are written under
the same names and layout, with the base's config, tokenizer and processor files beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from qwen2vl.adapter import read_adapter
from qwen2vl.hub import resolve_model_path
from qwen2vl.loader import canonical_name, checkpoint_files, read_tensors
from qwen2vl.train.checkpoint import copy_side_files


def merge(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    base, out = resolve_model_path(base), Path(out)
    weights = read_adapter(adapter)  # checked before anything is written
    if out.resolve() == Path(base).resolve():
        raise ValueError(f"{out}: the output must be another folder than the base")
    out.mkdir(parents=True, exist_ok=True)
    pending = dict(weights.modules)
    for file in checkpoint_files(Path(base)):
        tensors = {}
        for disk_name, read in read_tensors(file):
            t = read()
            module = canonical_name(disk_name).removesuffix(".weight")
            lora = pending.pop(module, None) if disk_name.endswith(".weight") else None
            if lora is not None:
                delta = lora.scale * (lora.B.float() @ lora.A.float())
                if delta.shape != t.shape:
                    raise ValueError(f"{adapter}: {module} adds a {tuple(delta.shape)} update to a "
                                     f"{tuple(t.shape)} weight; was it trained on another model?")
                t = (t.float() + delta).to(t.dtype)
            tensors[disk_name] = t.contiguous()
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
    if pending:
        raise ValueError(f"{adapter}: modules not in {base}: {sorted(pending)[:5]}; was it trained on another model?")
    index = Path(base) / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy(index, out / index.name)
    copy_side_files(Path(base), out)
    return out

