"""LoRA for training: the decoder's chosen linears wrapped as base(x) + scale * B(A(dropout(x))).

Computed as PEFT computes it (A initialised Kaiming-uniform, B zeros, so training starts from the base
model exactly), and saved in PEFT's format (qwen2vl/adapter.py), so what we train loads in PEFT and
transformers as well as in our engine. The frozen base linear keeps its own dtype (bf16 for big models);
A and B are float32 master weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.adapter import DECODER_LINEARS, TokenWeights, write_adapter
from qwen2vl.token_rows import attached_token_rows


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + lora * self.scale


def add_lora(model, targets: list[str], rank: int, alpha: float, dropout: float) -> list[str]:
    """Wrap each decoder linear named in `targets` (q_proj, ..., down_proj) in a LoRALinear, in place;
    returns the wrapped modules' names. A and B come from torch's global RNG (seed it first)."""
    unknown = sorted(set(targets) - set(DECODER_LINEARS))
    if unknown or not targets:
        raise ValueError(f"--lora-targets: {unknown or 'none given'}; choose among {', '.join(DECODER_LINEARS)}")
    wrapped = []
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, nn.Linear):
                    setattr(parent, name, LoRALinear(base, rank, alpha, dropout))
                    wrapped.append(f"model.layers.{i}.{parent_name}.{name}")
    return wrapped


def lora_modules(model) -> dict[str, LoRALinear]:
    """Our module name -> LoRALinear, for the ones add_lora made."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_lora(model, folder, targets: list[str], dropout: float, base: str | None):
    """The trained adapter (and its trained token rows, if any) as a PEFT adapter folder."""
    modules = lora_modules(model)
    first = next(iter(modules.values()))
    rows = attached_token_rows(model)
    tokens = TokenWeights(rows.token_of_row.tolist(), rows.rows) if rows is not None else None
    return write_adapter(folder, {name: (m.lora_A, m.lora_B) for name, m in modules.items()},
                         rank=first.rank, alpha=first.alpha, dropout=dropout, targets=targets, base=base,
                         tokens=tokens)
