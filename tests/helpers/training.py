"""Tiny checkpoints, pictures and JSONL files for the training tests.

`model_folder(folder)` saves a random-weight transformers model (the oracle) as a real checkpoint
folder with the real Qwen tokenizer and a preprocessor config, and returns the transformers model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen2vl.train.batch import pack
from qwen2vl.train.examples import encode_row
from qwen2vl.train.step import loss_sum
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def model_folder(folder: Path, seed: int = 0, tie: bool = False, **config):
    """A checkpoint folder (fp32, hub layout, tokenizer, preprocessor); returns the transformers model.
    `config`: more of build_reference's overrides (family="qwen2_5_vl", ...)."""
    hf = build_reference(seed=seed, vocab_size=151936, tie=tie, **config)
    save_checkpoint(hf, folder, tokenizer_dir=qwen_tokenizer_dir())
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return hf


def write_image(path: Path, seed: int, w: int = 56, h: int = 84) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSONL; a str row is written as it is (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sample_rows(folder: Path) -> list[dict]:
    """A few rows in both layouts: an image question, a two-image multi-turn, plain text, Qwen form."""
    write_image(folder / "a.png", 1)
    write_image(folder / "b.png", 2, 84, 56)
    return [
        {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                      {"role": "assistant", "content": "A noisy square."}], "images": ["a.png"]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Compare <image> and <image>."},
                      {"role": "assistant", "content": "The first is taller."},
                      {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Yes."}], "images": ["a.png", "b.png"]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"},
                                                   {"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Wide noise."}]}]},
    ]


def random_adapter(folder: Path, model_folder: Path, targets: list[str], rank: int, alpha: float, seed: int,
                   std: float = 0.2) -> Path:
    """A PEFT-format adapter with random A and B (B nonzero, so it changes the model) for the
    checkpoint in `model_folder`, written by our own writer."""
    import torch

    from qwen2vl.adapter import write_adapter
    from qwen2vl.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_pretrained(model_folder).text
    q, kv, d, i = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, i),
              "up_proj": (d, i), "down_proj": (i, d)}  # (in, out)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(cfg.num_hidden_layers):
        for name in targets:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            n_in, n_out = shapes[name]
            modules[f"model.layers.{layer}.{parent}.{name}"] = (
                torch.randn(rank, n_in, generator=g) * std, torch.randn(n_out, rank, generator=g) * std)
    return write_adapter(folder, modules, rank=rank, alpha=alpha, dropout=0.0, targets=targets, base=None)


def our_step(model, processor, rows):
    batch = pack([encode_row(r, processor, model.config) for r in rows])
    loss = loss_sum(model, batch) / batch.num_targets
    loss.backward()
    return loss.detach(), batch


def hf_step(hf, processor, rows, config):
    """transformers' mean loss over the same tokens: each row alone, weighted by its trained tokens."""
    examples = [encode_row(r, processor, config) for r in rows]
    total = sum(int((e.labels[1:] != -100).sum()) for e in examples)
    loss = 0
    for e in examples:
        ids = e.input_ids[None]
        extra = {}
        if e.pixel_values is not None:
            types = (ids == config.image_token_id).long()
            extra = dict(pixel_values=e.pixel_values, image_grid_thw=e.image_grid_thw, mm_token_type_ids=types)
        out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=e.labels[None], **extra)
        loss = loss + out.loss * int((e.labels[1:] != -100).sum()) / total
    loss.backward()
    return loss.detach()


def hf_name(ours: str) -> str:
    if ours.startswith("visual."):
        return "model." + ours
    if ours.startswith("model."):
        return "model.language_model." + ours[len("model."):]
    return ours
