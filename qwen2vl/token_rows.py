"""Adapters' own embedding rows for some tokens: PEFT's trainable tokens (`trainable_token_indices`).

A LoRA adapter may carry new rows for a few tokens of the embedding (tokens a fine-tune added, or ones the
base model never learnt). The model then reads those tokens through the adapter's rows, and when the
embedding is tied to the output head it scores them with those rows too; an untied head keeps its own (as
PEFT does). Rather than copy a vocabulary-sized table per adapter (or per forward, as PEFT's index_copy
does), the base embedding is looked up as it is and the adapter's rows are put in place of the hits; the
head's logits are computed as they are and the adapter's tokens' columns recomputed from its rows.

Several adapters are served at once, chosen per token row as the LoRA linears are (`slots`, the slot of
each row; slot 0 is the base model): `lookup[slot, token]` is the index in `rows` of that slot's row for the
token, or -1. Training has one adapter: `slots` None means every row uses `lookup[0]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenRows(nn.Module):
    def __init__(self, rows: torch.Tensor, lookup: torch.Tensor, slot_of_row: torch.Tensor,
                 token_of_row: torch.Tensor):
        super().__init__()
        if isinstance(rows, nn.Parameter):
            self.rows = rows  # training: the master weights
        else:
            self.register_buffer("rows", rows)  # [R, D]
        self.register_buffer("lookup", lookup)  # [slots, vocab] long: index in rows, or -1
        self.register_buffer("slot_of_row", slot_of_row)  # [R]
        self.register_buffer("token_of_row", token_of_row)  # [R]

    @classmethod
    def build(cls, tables: dict[int, tuple[list[int], torch.Tensor]], vocab: int, slots: int, *,
              trainable: bool = False) -> TokenRows:
        """{slot: (token ids, rows [n, D])} -> one TokenRows; `trainable` makes the rows a parameter."""
        rows, slot_of_row, token_of_row = [], [], []
        lookup = torch.full((slots, vocab), -1, dtype=torch.long)
        for slot, (ids, table) in tables.items():
            lookup[slot, torch.tensor(ids)] = torch.arange(len(ids)) + len(token_of_row)
            rows.append(table)
            slot_of_row += [slot] * len(ids)
            token_of_row += ids
        stacked = torch.cat(rows)
        return cls(nn.Parameter(stacked) if trainable else stacked, lookup, torch.tensor(slot_of_row),
                   torch.tensor(token_of_row))

    def embed(self, x: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """x [N, D] (the base embedding of ids [N]) with each hit replaced by its slot's row."""
        k = self.lookup[0, ids] if slots is None else self.lookup[slots, ids]
        hit = k >= 0
        return torch.where(hit[:, None], self.rows[k.clamp(min=0)], x)  # the wider dtype: training's float32

    def logits(self, logits: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """logits [n, vocab] of hidden [n, D] with each row's slot's tokens scored by that slot's rows."""
        scores = hidden @ self.rows.to(hidden.dtype).T  # [n, R]
        wanted = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device) if slots is None \
            else slots[:, None]
        # one column per (row, token): a slot holds a token once
        i, r = (self.slot_of_row[None, :] == wanted).nonzero(as_tuple=True)
        return logits.index_put((i, self.token_of_row[r]), scores[i, r].to(logits.dtype))


class RowsEmbedding(nn.Module):
    """An embedding read through TokenRows; `lora_rows` (lora.LoRARows) gives each row's slot, None in training."""

    def __init__(self, base: nn.Module, token_rows: TokenRows, lora_rows=None):
        super().__init__()
        self.base, self.token_rows, self.lora_rows = base, token_rows, lora_rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slots = None if self.lora_rows is None else self.lora_rows.rows
        return self.token_rows.embed(self.base(ids), ids, slots)


class RowsHead(nn.Module):
    """A (tied) output head whose TokenRows tokens are scored with their rows; the slots as RowsEmbedding's."""

    def __init__(self, base: nn.Module, token_rows: TokenRows, lora_rows=None):
        super().__init__()
        self.base, self.token_rows, self.lora_rows = base, token_rows, lora_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        slots = None if self.lora_rows is None else self.lora_rows.rows
        assert slots is None or slots.shape[0] == hidden.shape[0], "the runner sets one slot per logits row"
        return self.token_rows.logits(self.base(hidden), hidden, slots)


def attached_token_rows(model) -> TokenRows | None:
    """The TokenRows the model's embedding is read through, or None."""
    embed = model.model.embed_tokens
    return embed.token_rows if isinstance(embed, RowsEmbedding) else None


def attach_token_rows(model, token_rows: TokenRows, lora_rows=None) -> None:
    """Read the embedding through `token_rows`, and score with them when the head is tied to it."""
    tied = model.config.tie_word_embeddings
    model.model.embed_tokens = RowsEmbedding(model.model.embed_tokens, token_rows, lora_rows)
    if tied:
        model.lm_head = RowsHead(model.lm_head, token_rows, lora_rows)
