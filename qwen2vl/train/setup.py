"""The model a run trains: loaded from a checkpoint (or randomly initialised, or its decoder alone), with what
is trained chosen and put in float32 (master weights), the rest frozen in the run's dtype.

- LoRA (the default): every base weight frozen, LoRA A/B on the chosen decoder linears trained.
- full (`--full`): the decoder, its embeddings and head trained; the vision tower too with
  `--train-vision` (else frozen: its features are already good, and it is a third of the 2B).
- some layers (`--full --train-layers 4,5`): only those decoder layers trained, everything else frozen (new
  layers on top of a trained decoder, qwen2vl/demo/grow.py, learn while the layers below keep every answer).
- some tokens (`--full --train-tokens IDS`): only those tokens' rows of the embedding (and of an untied
  head) trained, every other weight frozen (new tokens, or tokens the model never saw in training); the
  whole embedding stays one tensor (a gradient mask), as the full checkpoint it is written into.
- LoRA and some tokens (`--train-tokens IDS` without `--full`): PEFT's trainable tokens beside the
  adapter, those rows of the embedding (and of a tied head) a small tensor of their own
  (qwen2vl/token_rows.py), saved in the adapter; no vocabulary-sized gradient or optimizer state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model import Qwen2VL
from qwen2vl.text import RMSNorm
from qwen2vl.token_rows import TokenRows, attach_token_rows
from qwen2vl.train.lora import add_lora
from qwen2vl.train.step import checkpoint_layers


def load_for_training(folder: Path, *, dtype: torch.dtype, device, full: bool, train_vision: bool,
                      init_random: str = "", init_vision_scale: float = 1.0, lora: dict | None = None,
                      gradient_checkpointing: bool = False, train_tokens: list[int] | None = None,
                      train_layers: list[int] | None = None) -> Qwen2VL:
    """`lora`: {targets, rank, alpha, dropout} for LoRA runs (None with full=True); `train_tokens`: with
    full=True, train only these rows of the embedding and head; `train_layers`: with full=True, train only
    these decoder layers; `init_random`: "all" (random weights) or "decoder" (the folder's vision tower, a new
    decoder)."""
    if init_random == "all":
        model = random_model(folder, device, vision_scale=init_vision_scale)
    elif init_random == "decoder":
        model = random_decoder(folder, device)
    else:
        model = Qwen2VL.from_pretrained(folder, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    if full and train_tokens:
        train_rows(model, train_tokens)
    elif full:
        if train_layers:  # nothing else (the CLI refuses --train-vision beside it)
            assert not train_vision
            trained = [_decoder_layer(model, i) for i in train_layers]
        else:
            trained = [model.model, model.lm_head] + ([model.visual] if train_vision else [])
        for module in trained:
            for p in module.parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
    else:
        assert lora is not None and not train_vision
        add_lora(model, **lora)  # A and B are new float32 parameters, trained
        if train_tokens:
            add_token_rows(model, train_tokens)
    if gradient_checkpointing:
        checkpoint_layers(model.model.layers)
        if full and train_vision:
            checkpoint_layers(model.visual.blocks)
    return model.train()


def _decoder_layer(model: Qwen2VL, index: int) -> nn.Module:
    layers = model.model.layers
    if not 0 <= index < len(layers):
        raise ValueError(f"--train-layers: the decoder has layers 0-{len(layers) - 1}, not {index}")
    return layers[index]


def train_rows(model: Qwen2VL, ids: list[int]) -> None:
    """Make the embedding (and an untied head) trainable with a gradient of zero outside rows `ids`, so
    that AdamW (no weight decay) leaves every other row as it was."""
    _check_ids(model, ids)
    for weight in {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
        mask = torch.zeros(weight.shape[0], 1, device=weight.device)
        mask[sorted(set(ids))] = 1.0
        weight.data = weight.data.float()
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))


def add_token_rows(model: Qwen2VL, ids: list[int]) -> None:
    """Rows `ids` of the embedding as a float32 parameter the model reads them through (token_rows.py)."""
    _check_ids(model, ids)
    ids = sorted(set(ids))
    weight = model.model.embed_tokens.weight
    rows = weight.detach()[torch.tensor(ids, device=weight.device)].float().clone()
    token_rows = TokenRows.build({0: (ids, rows)}, weight.shape[0], 1, trainable=True).to(weight.device)
    attach_token_rows(model, token_rows)


def _check_ids(model: Qwen2VL, ids: list[int]) -> None:
    vocab = model.model.embed_tokens.weight.shape[0]
    bad = sorted({i for i in ids if not 0 <= i < vocab})
    if bad:
        raise ValueError(f"--train-tokens: ids {bad[:5]} are outside the vocabulary (0-{vocab - 1})")


def random_model(folder: Path, device, vision_scale: float = 1.0) -> Qwen2VL:
    """A Qwen2VL of `folder`'s config.json with transformers' initialisation: normal(0,
    initializer_range) weights and embeddings, zero biases, unit norms. The folder's weights, if it
    has any, are not read. `vision_scale` scales the vision merger's output layer."""
    with torch.device(device):
        model = Qwen2VL(Qwen2VLConfig.from_pretrained(folder))
    initialise(model, initializer_range(folder))
    if vision_scale != 1.0:  # visual features start near the text embeddings' size (a from-scratch run)
        with torch.no_grad():
            model.visual.merger.mlp[-1].weight.mul_(vision_scale)
    tie_head(model)
    return model


def random_decoder(folder: Path, device) -> Qwen2VL:
    """`folder`'s checkpoint with its vision tower kept and the decoder, embeddings and head initialised as
    random_model does: a new decoder taught to read a trained tower."""
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32, device=device)
    std = initializer_range(folder)
    initialise(model.model, std)
    initialise(model.lm_head, std)
    tie_head(model)
    return model


def tie_head(model: Qwen2VL) -> None:
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def initializer_range(folder: Path) -> float:
    raw = json.loads((Path(folder) / "config.json").read_text())
    return raw.get("initializer_range") or (raw.get("text_config") or {}).get("initializer_range") or 0.02


def initialise(root: nn.Module, std: float) -> None:
    """transformers' initialisation of every module under `root`."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of everything trained (a tied head appears once, as the embedding)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
