"""Fast CPU linears: oneDNN on weights reordered once, at load, into oneDNN's own blocked layout.

Decode multiplies one token (or a handful) by every weight of the model, so its speed is the rate
at which weights stream from memory. `F.linear` in bf16 hands oneDNN a plain row-major weight,
which it re-blocks or walks slowly on every call: with one row it streams weights at ~70% of the
memory read rate. Reordering the weight once (`mkldnn._reorder_linear_weight`, the layout
inductor's freezing pass uses) and calling `mkldnn._linear_pointwise` on it streams at ~100% of
the read probe for the big decode shapes, is as fast as F.linear for prefill, and needs no
compiler. Measured alternatives (torch.mv, an inductor-compiled reduction) were slower; see
docs/performance.md.

Swapping happens after loading (`speed_up_linears(model)`), so the model file never knows. The
reordered weight is an opaque oneDNN tensor: inference only, no state_dict, no deepcopy, and a
tied lm_head gets its own reordered copy (the embedding keeps the plain one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def reorder_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [N, K] in oneDNN's blocked layout, or None where oneDNN can't take it.

    None for non-CPU tensors, builds without oneDNN, and dtypes this CPU has no oneDNN path for
    (fp16 needs avx512_fp16 or avx_ne_convert).
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        # batch-size hint 1: decode's shape; prefill measured just as fast on this layout
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    except RuntimeError:
        return None


class FastLinear(nn.Module):
    """Drop-in for an inference nn.Linear: oneDNN on a reordered weight, F.linear as fallback."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = reorder_weight(weight)  # opaque, so a plain attribute rather than a buffer
        # the plain weight is kept only when it is the path taken
        self.weight = None if self.packed is not None else nn.Parameter(weight.detach(), requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FastLinear:
        return cls(linear.weight, linear.bias)

    # dynamo traces the oneDNN op but inductor can only lower it on weights it froze itself; a
    # compiled model should keep nn.Linear and set torch._inductor.config.freezing = True instead
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dtype != self.packed.dtype:
            return F.linear(x, self.dense_weight().to(x.dtype), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")

    def dense_weight(self) -> torch.Tensor:
        """The plain [N, K] weight (rebuilt from the reordered one when that is all that is kept)."""
        return self.weight if self.packed is None else self.packed.to_dense()

    def extra_repr(self) -> str:
        path = "oneDNN reordered" if self.packed is not None else "F.linear"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {path}"


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing all of `linears` on the same input (q/k/v, or gate/up).

    The output is the concatenation along the last dim; split it by the listed out_features.
    It streams the same bytes as the separate calls but pays the per-call cost once, which
    matters for the small k/v projections (256 x 1536 in the 2B). It is a plain nn.Linear, so
    speed_up_linears and quantize_model treat it like any other.
    """
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(b is not None for b in biases), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([
            b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)
        ]), requires_grad=False)
    return fused


def replace_linears(model: nn.Module, make, skip: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear of `model` whose qualified name doesn't start with one of `skip` by
    `make(linear)`, in place; returns how many were replaced."""
    # names only: holding the old modules until the end would keep every original weight alive
    # next to its replacement (measured: peak RSS +2.9 GB for the 2B)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and not name.startswith(skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))
    return len(names)


def speed_up_linears(model: nn.Module, skip: tuple[str, ...] = ("visual",)) -> int:
    """Swap every nn.Linear of `model` for a FastLinear in place; returns how many were swapped.

    Modules whose qualified name starts with one of `skip` stay as they are: by default the
    vision tower (`LLM` swaps it too, all but the patch embedding).
    """
    return replace_linears(model, FastLinear.from_linear, skip)
