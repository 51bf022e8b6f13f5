"""`qwen2vl merge BASE ADAPTER OUT`: a LoRA adapter folded into a full checkpoint, W' = W + scale * B A, its
trained token rows (if any) put in place of the embedding's (and a tied head's stored copy's); with
`tokens_only`, the rows alone (a LoRA trained beside new rows to teach them, then set aside); or, given a
full run's `checkpoint-STEP` instead of an adapter, that step's weights as a checkpoint folder.

An adapter works on the checkpoint's tensors directly (no model built): every file of BASE is read, the
adapted weights are updated in float32 and rounded back to their stored dtype, and the files are written
under the same names and layout, with the base's config, tokenizer and processor files beside them. A step
is loaded into the model BASE builds and written as the run's end writes its model (`save_full`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen2vl.adapter import TokenWeights, read_adapter
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.hub import resolve_model_path
from qwen2vl.loader import canonical_name, checkpoint_dtype, checkpoint_files, read_tensors
from qwen2vl.train.checkpoint import copy_side_files, save_full


def merge(base: str | Path, adapter: str | Path, out: str | Path, tokens_only: bool = False) -> Path:
    base, out = resolve_model_path(base), Path(out)
    if out.resolve() == Path(base).resolve():
        raise ValueError(f"{out}: the output must be another folder than the base")
    if (Path(adapter) / "trainable.safetensors").is_file() and not (Path(adapter) / "adapter_config.json").is_file():
        return export_step(Path(base), Path(adapter), out)
    weights = read_adapter(adapter)  # checked before anything is written
    if tokens_only and weights.tokens is None:
        raise ValueError(f"{adapter}: --tokens-only, but the adapter holds no token rows")
    out.mkdir(parents=True, exist_ok=True)
    pending = {} if tokens_only else dict(weights.modules)
    # the rows replace the embedding's, and a tied head's stored copy (some checkpoints keep one) must agree
    rows_into = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if Qwen2VLConfig.from_pretrained(base)
                                                 .tie_word_embeddings else set())
    rows_written = False
    for file in checkpoint_files(Path(base)):
        tensors = {}
        for disk_name, read in read_tensors(file):
            t = read()
            if weights.tokens is not None and canonical_name(disk_name) in rows_into:
                t = _with_rows(t, weights.tokens, adapter)
                rows_written |= canonical_name(disk_name) == "model.embed_tokens.weight"
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
    if weights.tokens is not None and not rows_written:
        raise ValueError(f"{adapter}: token rows, but {base} stores no model.embed_tokens.weight to put them in")
    index = Path(base) / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy(index, out / index.name)
    copy_side_files(Path(base), out)
    return out


def _with_rows(weight: torch.Tensor, tokens: TokenWeights, adapter) -> torch.Tensor:
    tokens.check_fits(weight.shape[0], weight.shape[1], str(adapter))
    weight = weight.clone()
    weight[torch.tensor(tokens.ids)] = tokens.rows.to(weight.dtype)
    return weight


def export_step(base: Path, step: Path, out: Path) -> Path:
    """A full run's `checkpoint-STEP` (its trained weights, float32, by parameter name) over `base`'s weights,
    written as the run's end writes its model (`save_full`, in `base`'s stored dtype): a run stopped early,
    or one of its steps, becomes a model folder that `--model`, LLM and transformers load. `base` is the run's
    --model, which supplies what was not trained (the vision tower without --train-vision)."""
    from qwen2vl.model import Qwen2VL

    saved = load_file(str(step / "trainable.safetensors"))
    model = Qwen2VL.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    unknown = sorted(n for n in saved if n not in params or params[n].shape != saved[n].shape)
    if unknown:
        raise ValueError(f"{step}: {unknown[:5]} are not parameters of {base} (or not of their shapes); "
                         "was it trained on another model?")
    with torch.no_grad():
        for name, t in saved.items():
            params[name].copy_(t)
    return save_full(model, base, out, checkpoint_dtype(base))
