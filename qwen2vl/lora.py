"""Serving LoRA adapters: several at once, chosen per token row, on top of whatever linear the base uses.

After loading (and fusing, quantizing, speeding up), each adapted decoder linear is wrapped:

    y = base(x) + ((x @ A.T) * scales[rows]) @ B.T

where A stacks the A matrices of every adapter (and, for a fused q|k|v or gate|up linear, of every
part) as C = sum of ranks rows, B [out, C] holds each B in its part's output rows and its own columns
(zeros elsewhere), and `scales[s]` [C] is adapter slot s's scale on its own columns, 0 on the others.
Slot 0 is the base model (all zeros). `rows` [N] is each packed token's slot, which the engine's runner
sets on the shared `LoRARows` before every forward. Two matmuls whatever the mix of adapters in a
batch, no per-adapter loop, no data-dependent shapes; another adapter's columns contribute exact zeros.

`base` is called as it is, so a plain nn.Linear, a FastLinear or an int8/int4 linear all work; the C
decode step (kernels/decode_step.py) sees a module that is none of its kernels and stays off.

Adapters with trainable tokens (new embedding rows for some tokens) are read through one TokenRows
(qwen2vl/token_rows.py) with the same per-row slots: the embedding's rows are per token row of the step,
the head's per logits row, so the runner sets the slots again before it computes logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.adapter import Adapter
from qwen2vl.token_rows import TokenRows, attach_token_rows


class LoRARows:
    """The adapter slot of each token row of the current step, shared by every MultiLoRALinear."""

    def __init__(self, names: list[str]):
        self.names = names  # slot i + 1 is names[i]; slot 0 is the base model
        self.rows: torch.Tensor | None = None

    def set(self, slots: list[int], counts: list[int], device) -> None:
        """Sequence i's `counts[i]` tokens use adapter slot `slots[i]` (packing order)."""
        self.rows = torch.repeat_interleave(torch.tensor(slots), torch.tensor(counts)).to(device)


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, rows: LoRARows):
        super().__init__()
        self.base = base
        self.register_buffer("A", A)  # [C, in]
        self.register_buffer("B", B)  # [out, C]
        self.register_buffer("scales", scales)  # [slots, C]
        self.lora_rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.lora_rows.rows
        assert rows is not None and rows.shape[0] == x.shape[0], "the runner sets one adapter slot per token row"
        h = F.linear(x, self.A) * self.scales[rows]  # [N, C]: each row keeps only its adapter's columns
        return self.base(x) + F.linear(h, self.B)


# (linear attribute, its parts in output order) of a layer's attention and MLP, fused or not
_ATTENTION = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("q_proj", ("q_proj",)), ("k_proj", ("k_proj",)),
              ("v_proj", ("v_proj",)), ("o_proj", ("o_proj",)))
_MLP = (("gate_up_proj", ("gate_proj", "up_proj")), ("gate_proj", ("gate_proj",)), ("up_proj", ("up_proj",)),
        ("down_proj", ("down_proj",)))


def attach_adapters(model, adapters: dict[str, Adapter]) -> LoRARows:
    """Wrap every decoder linear some adapter targets; `model.lora` becomes the LoRARows the runner fills.
    Adapter slots are 1, 2, ... in the order of `adapters`."""
    cfg = model.config.text
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    width = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": cfg.hidden_size, "gate_proj": cfg.intermediate_size,
             "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}
    rows = LoRARows(list(adapters))
    seen = {name: set() for name in adapters}
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent, table in (("self_attn", layer.self_attn, _ATTENTION), ("mlp", layer.mlp, _MLP)):
            for attr, parts in table:
                base = getattr(parent, attr, None)
                if base is None:
                    continue
                assert base.out_features == sum(width[p] for p in parts), (attr, base.out_features)
                modules = [(f"model.layers.{i}.{parent_name}.{p}", width[p]) for p in parts]
                wrapped = _wrap(base, modules, adapters, rows, model.dtype, model.device, seen)
                if wrapped is not None:
                    setattr(parent, attr, wrapped)
    for name, adapter in adapters.items():
        missing = sorted(set(adapter.modules) - seen[name])
        if missing:
            raise ValueError(f"adapter {name!r} ({adapter.path}): modules not in this model: {missing[:5]}")
    tables = {}
    for slot, (name, adapter) in enumerate(adapters.items(), 1):
        if adapter.tokens is not None:
            adapter.tokens.check_fits(cfg.vocab_size, cfg.hidden_size, f"adapter {name!r}")
            tables[slot] = (adapter.tokens.ids, adapter.tokens.rows.to(model.device, model.dtype))
    if tables:
        token_rows = TokenRows.build(tables, cfg.vocab_size, len(adapters) + 1)
        attach_token_rows(model, token_rows.to(model.device), rows)
    model.lora = rows
    return rows


def _wrap(base, modules: list[tuple[str, int]], adapters: dict[str, Adapter], rows, dtype, device, seen):
    """A MultiLoRALinear over `base`, whose output is `modules`' outputs (name, width) side by side;
    None if no adapter targets any of them."""
    A, blocks = [], []  # blocks: (slot, first output row, B, scale)
    for slot, (name, adapter) in enumerate(adapters.items(), 1):
        offset = 0
        for module, size in modules:
            lora = adapter.modules.get(module)
            if lora is not None:
                if lora.B.shape[0] != size or lora.A.shape[1] != base.in_features:
                    raise ValueError(f"adapter {name!r}: {module} maps {lora.A.shape[1]} -> {lora.B.shape[0]}, the "
                                     f"model's {base.in_features} -> {size}; was it trained on another model?")
                A.append(lora.A)
                blocks.append((slot, offset, lora.B, lora.scale))
                seen[name].add(module)
            offset += size
    if not A:
        return None
    A_all = torch.cat(A).to(device, dtype)
    B_all = torch.zeros(base.out_features, A_all.shape[0], dtype=dtype, device=device)
    scales = torch.zeros(len(adapters) + 1, A_all.shape[0], dtype=dtype, device=device)
    c = 0
    for slot, offset, b, scale in blocks:
        rank = b.shape[1]
        B_all[offset : offset + b.shape[0], c : c + rank] = b.to(device, dtype)
        scales[slot, c : c + rank] = scale
        c += rank
    return MultiLoRALinear(base, A_all, B_all, scales, rows)
