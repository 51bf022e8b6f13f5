"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are what PEFT 0.21 writes for transformers 5's Qwen2VLForConditionalGeneration,
`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight` (PEFT with transformers
4 wrote `base_model.model.model.layers.0...`, read too). For a target linear, A is [r, in] and B
[out, r], and the adapted layer computes base(x) + scale * B(A(x)), scale = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern give per-module values).

Adapters on the decoder's linears (q/k/v/o, gate/up/down) are what we train, merge and serve, with
PEFT's trainable tokens beside them (`trainable_token_indices`: new embedding rows for a few tokens,
`...embed_tokens.token_adapter.trainable_tokens_delta` [n, D], which replace the base's rows and, with
tied embeddings, the head's: qwen2vl/token_rows.py), or those rows alone (PEFT's TRAINABLE_TOKENS
adapters, `token_indices`). An adapter with anything else (DoRA, trained biases, modules_to_save, the
vision tower, whole embeddings, an untied head's tokens) is refused with its reason rather than half
applied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen2vl.loader import canonical_name

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model."
_MODULE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# beside LoRA `...embed_tokens.token_adapter.trainable_tokens_delta`; alone (TRAINABLE_TOKENS) without token_adapter
_TOKENS = re.compile(r"^(?P<module>.+?)(?:\.token_adapter)?\.trainable_tokens_delta$")
EMBEDDING = "model.embed_tokens"


@dataclass
class LoRAWeights:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


@dataclass
class TokenWeights:
    ids: list[int]  # token ids, in the order of rows
    rows: torch.Tensor  # [n, D]: their embedding rows, in place of the base's

    def check_fits(self, vocab: int, width: int, what: str) -> None:
        """A ValueError naming `what` unless these rows fit an embedding of `vocab` tokens, `width` wide."""
        bad = [i for i in self.ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} are outside this model's vocabulary (0-{vocab - 1}); "
                             "was it trained on another model?")
        if self.rows.shape[1] != width:
            raise ValueError(f"{what}: token rows {self.rows.shape[1]} wide, this model's embedding {width}; "
                             "was it trained on another model?")


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoRAWeights]  # by our module name, "model.layers.0.self_attn.q_proj"
    tokens: TokenWeights | None = None


def peft_key(module: str, which: str) -> str:
    """PEFT's tensor name for our module name ("model.layers.0.self_attn.q_proj") and "A" or "B"."""
    hf = "model.language_model." + module.removeprefix("model.") if module.startswith("model.") else module
    return f"{_PREFIX}{hf}.lora_{which}.weight"


def read_adapter(folder: str | Path) -> Adapter:
    """A PEFT LoRA adapter folder, checked: a ValueError names what we can't apply."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not a LoRA adapter folder (needs {CONFIG} and {WEIGHTS})")
    config = json.loads((folder / CONFIG).read_text())
    _check_config(config, folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    tokens = head = None
    for key, tensor in load_file(str(folder / WEIGHTS)).items():
        if t := _TOKENS.match(key.removeprefix(_PREFIX)):
            if canonical_name(t["module"]) == "lm_head" and config.get("peft_type") == "TRAINABLE_TOKENS":
                head = tensor  # a tied head's copy of the embedding's rows, which PEFT saves alone
            else:
                tokens = _token_weights(config, canonical_name(t["module"]), tensor, folder)
            continue
        m = _KEY.match(key.removeprefix(_PREFIX))
        module = canonical_name(m["module"]) if m else None
        if module is None or not _MODULE.match(module):
            raise ValueError(f"{folder}: tensor {key} is not a LoRA weight of a decoder linear "
                             f"({', '.join(DECODER_LINEARS)}); only those are supported")
        pairs.setdefault(module, {})[m["which"]] = tensor
    if not pairs and tokens is None:
        raise ValueError(f"{folder}: {WEIGHTS} holds no LoRA weights")
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder}: {module} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{folder}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} don't chain")
        modules[module] = LoRAWeights(a, b, _scale(config, module, a.shape[0]))
    if (config.get("trainable_token_indices") or config.get("peft_type") == "TRAINABLE_TOKENS") and tokens is None:
        raise ValueError(f"{folder}: {CONFIG} names trainable tokens but {WEIGHTS} holds no embedding rows for them")
    if head is not None and not torch.equal(head, tokens.rows):
        raise ValueError(f"{folder}: lm_head has token rows of its own (an untied head's): not supported")
    return Adapter(folder, config, modules, tokens)


def _token_weights(config: dict, module: str, rows: torch.Tensor, folder: Path) -> TokenWeights:
    """The trainable tokens' rows of `module`, with their ids from the config (a list, or {module: list}):
    `trainable_token_indices` beside LoRA, `token_indices` in a TRAINABLE_TOKENS adapter."""
    if module != EMBEDDING:
        raise ValueError(f"{folder}: trainable tokens on {module}: only the embedding's are supported")
    field = "token_indices" if config.get("peft_type") == "TRAINABLE_TOKENS" else "trainable_token_indices"
    ids = config.get(field)
    if isinstance(ids, dict):
        named = [v for k, v in ids.items() if EMBEDDING.endswith(k.split(".")[-1])]
        if len(ids) != 1 or not named:
            raise ValueError(f"{folder / CONFIG}: {field} {sorted(ids)}: only the embedding's tokens are supported")
        ids = named[0]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{folder / CONFIG}: {field} must list token ids, got {ids!r}")
    if len(set(ids)) != len(ids) or rows.dim() != 2 or rows.shape[0] != len(ids):
        raise ValueError(f"{folder}: {len(ids)} trainable token ids (distinct: {len(set(ids))}) for token rows "
                         f"of shape {tuple(rows.shape)}")
    return TokenWeights(ids, rows)


def _check_config(config: dict, folder: Path) -> None:
    refuse = {
        "peft_type": (config.get("peft_type") not in ("LORA", "TRAINABLE_TOKENS"),
                      "only LoRA adapters (with trainable tokens or without) and trainable tokens are supported"),
        "use_dora": (bool(config.get("use_dora")), "DoRA is not supported"),
        "bias": (config.get("bias", "none") != "none", "adapters that train biases are not supported"),
        "lora_bias": (bool(config.get("lora_bias")), "adapters with a lora_B bias are not supported"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D layers) is not supported"),
        "modules_to_save": (bool(config.get("modules_to_save")), "modules_to_save (fully trained modules) is "
                            "not supported; merge the adapter into a full checkpoint elsewhere"),
        "layer_replication": (bool(config.get("layer_replication")), "layer_replication is not supported"),
    }
    for field, (bad, why) in refuse.items():
        if bad:
            raise ValueError(f"{folder / CONFIG}: {field} = {config.get(field)!r}: {why}")


def _scale(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r for `module` (PEFT's rule: a pattern matches the end of the module's name)."""
    hf = peft_key(module, "A").removeprefix(_PREFIX).removesuffix(".lora_A.weight")
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def write_adapter(folder: str | Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int,
                  alpha: float, dropout: float, targets: list[str], base: str | None,
                  tokens: TokenWeights | None = None) -> Path:
    """Save {module: (A, B)} (and `tokens`' rows) as a PEFT adapter PEFT itself loads (PeftModel.from_pretrained)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[peft_key(module, "A")] = a.detach().cpu().contiguous()
        tensors[peft_key(module, "B")] = b.detach().cpu().contiguous()
    if tokens is not None:
        key = peft_key(EMBEDDING, "A").removesuffix(".lora_A.weight") + ".token_adapter.trainable_tokens_delta"
        tensors[key] = tokens.rows.detach().cpu().contiguous()
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "trainable_token_indices": list(tokens.ids) if tokens is not None else None,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
