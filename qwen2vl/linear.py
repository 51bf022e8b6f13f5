"""Fast CPU linears: weights reordered once, at load, into a layout a fast kernel streams.

Decode multiplies one token (or a handful) by every weight of the model, so its speed is the rate
at which weights stream from memory. `F.linear` in bf16 hands oneDNN a plain row-major weight,
which it re-blocks or walks slowly on every call: with one row it streams weights at ~70% of the
memory read rate. Two better paths, chosen per weight at load:
- bf16 on a CPU with AVX-512 BF16: our own kernel (backends/cpu/csrc/bf16_gemm.c) on weights packed for
  it. Decode rows stream the weights at the read probe's rate for every 2B shape (oneDNN below:
  59-89%, worst on the small q/k/v and o), prefill and batched rows run a register tile as fast
  as oneDNN's GEMM. Measured in docs/performance.md.
- otherwise oneDNN on a weight reordered once (`mkldnn._reorder_linear_weight`, the layout
  inductor's freezing pass uses) through `mkldnn._linear_pointwise`: ~100% of the read probe for
  the big decode shapes, as fast as F.linear for prefill, no compiler needed.

Swapping happens after loading (`speed_up_linears(model)`), so the model file never knows. The
reordered weight is not a parameter: inference only, no state_dict, no deepcopy, and a tied
lm_head gets its own reordered copy (the embedding keeps the plain one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qwen2vl.backends.cpu import gemm


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


def kernel_takes(weight: torch.Tensor) -> bool:
    """Whether our bf16 kernel can hold `weight` [N, K]: bf16 on the CPU, K even, kernel built."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0
            and gemm.bf16_library() is not None)


class FastLinear(nn.Module):
    """Drop-in for an inference nn.Linear: our bf16 kernel or oneDNN on a reordered weight, with
    F.linear as the fallback (other input dtypes, weights neither takes)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True,
                 huge_pages: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.path = "F.linear"
        self.packed = None  # opaque or oddly shaped, so a plain attribute rather than a buffer
        if use_kernel and kernel_takes(weight):
            self.packed, self.path = gemm.pack_bf16(weight.detach(), huge_pages), "bf16 kernel"
        elif (packed := reorder_weight(weight)) is not None:
            self.packed, self.path = packed, "oneDNN"
        # the plain weight is kept only when it is the path taken
        self.weight = None if self.packed is not None else nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None and self.path == "bf16 kernel":
            bias = bias.detach().to(torch.bfloat16).contiguous()  # the kernel reads bf16
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_kernel: bool = True, huge_pages: bool = True) -> FastLinear:
        return cls(linear.weight, linear.bias, use_kernel, huge_pages)

    # dynamo traces the oneDNN op but inductor can only lower it on weights it froze itself; a
    # compiled model should keep nn.Linear and set torch._inductor.config.freezing = True instead
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "bf16 kernel" and x.dtype == torch.bfloat16:
            y = gemm.bf16_gemm(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if self.path == "oneDNN" and x.dtype == self.packed.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> torch.Tensor:
        """The plain [N, K] weight (rebuilt from the reordered one when that is all that is kept)."""
        if self.path == "bf16 kernel":
            return gemm.unpack_bf16(self.packed, self.out_features)
        return self.weight if self.packed is None else self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.path}"


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


def speed_up_linears(model: nn.Module, skip: tuple[str, ...] = ("visual",), huge_pages: bool = True) -> int:
    """Swap every nn.Linear of `model` for a FastLinear in place; returns how many were swapped.

    Modules whose qualified name starts with one of `skip` stay as they are: by default the
    vision tower (`LLM` swaps it too, all but the patch embedding, without huge pages: its GEMMs
    are compute-bound, and finding huge pages at load costs time).
    """
    return replace_linears(model, lambda linear: FastLinear.from_linear(linear, huge_pages=huge_pages), skip)
