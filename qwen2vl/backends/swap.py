"""Swapping a model's linears after load: how quantization and the fast CPU linears get in without
the model files knowing (gpt-fast's way)."""

from __future__ import annotations

import torch.nn as nn


def replace_linears(model: nn.Module, make, skip: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear of `model` whose qualified name doesn't start with one of `skip` by
    `make(name, linear)`, in place; returns how many were replaced."""
    # names only: holding the old modules until the end would keep every original weight alive
    # next to its replacement (measured: peak RSS +2.9 GB for the 2B)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and not name.startswith(skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
    return len(names)
