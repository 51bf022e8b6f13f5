"""Fast CPU linears: weights reordered once, at load, into a layout a fast kernel streams.

Decode multiplies one token (or a handful) by every weight of the model, so its speed is the rate
at which weights stream from memory. `F.linear` in bf16 hands oneDNN a plain row-major weight,
which it re-blocks or walks slowly on every call: with one row it streams weights at ~70% of the
memory read rate. Better paths, chosen per weight at load by the weight and the dtype the matmul
should run in (`compute_dtype`, the backend's policy: see backends/cpu/__init__.py):
- bf16 arithmetic on a CPU with AVX-512 BF16: our own kernel (csrc/bf16_gemm.c) on weights
  packed for it. Decode rows stream the weights at the read probe's rate for every 2B shape
  (oneDNN below: 59-89%, worst on the small q/k/v and o), prefill and batched rows run a register
  tile as fast as oneDNN's GEMM. Measured in docs/performance.md.
- float32 arithmetic on bf16 weights (CPUs without bf16 matmuls, where torch emulates them ~6-10x
  slower than float32): our csrc/bf16w_gemm.c on the same packed bf16 weights, widened to fp32 in
  registers (activations bf16 or float32). Decode reads half the bytes a float32 copy would, and the
  prefill register tile beat oneDNN's float32 GEMM at AVX2 (benchmarks/cpu_gemm_tier.py); where it
  can't be built, oneDNN on a float32 copy.
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

from qwen2vl.backends.cpu import gemm, isa, packing
from qwen2vl.backends.cpu.packed_cache import PackedCache
from qwen2vl.backends.cpu.untraced import untraced
from qwen2vl.backends.swap import replace_linears


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


def kernel_takes(weight: torch.Tensor, compute: torch.dtype = torch.bfloat16) -> bool:
    """Whether our kernel for `compute` arithmetic can hold `weight` [N, K]: bf16 on the CPU, K even,
    the kernel built (bf16_gemm for bf16 arithmetic, bf16w_gemm for float32)."""
    library = {torch.bfloat16: gemm.bf16_library, torch.float32: gemm.bf16w_library}.get(compute)
    return (library is not None and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.shape[1] % 2 == 0 and library() is not None)


class FastLinear(nn.Module):
    """Drop-in for an inference nn.Linear: our bf16 kernel or oneDNN on a reordered weight, with
    F.linear as the fallback (other input dtypes, weights neither takes). The output has the
    input's dtype; the matmul runs in `compute_dtype` (default: the CPU's policy for the weight's
    dtype, isa.Isa.matmul_dtype: float32 for bf16 weights where bf16 matmuls would be emulated)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, use_kernel: bool = True,
                 huge_pages: bool = True, compute_dtype: torch.dtype | None = None, pack=packing.pack_bf16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        compute = compute_dtype or isa.current().matmul_dtype(weight.dtype)
        self.path = "F.linear"
        self.packed = None  # opaque or oddly shaped, so a plain attribute rather than a buffer
        if use_kernel and kernel_takes(weight, compute):
            self.packed = pack(weight.detach(), huge_pages)  # packing.pack_bf16, or its packed_cache.py copy
            self.path = "bf16 kernel" if compute == torch.bfloat16 else "bf16w kernel"
        elif (packed := reorder_weight(weight.detach().to(compute))) is not None:
            self.packed, self.path = packed, "oneDNN"
        # the plain weight is kept only when it is the path taken
        self.weight = None if self.packed is not None else nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:  # in the dtype the path adds it in (our kernels read bf16)
            bias = bias.detach().to(torch.bfloat16 if self.path.endswith("kernel") else compute).contiguous()
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_kernel: bool = True, huge_pages: bool = True,
                    compute_dtype: torch.dtype | None = None, pack=packing.pack_bf16) -> FastLinear:
        return cls(linear.weight, linear.bias, use_kernel, huge_pages, compute_dtype, pack)

    # dynamo traces the oneDNN op but inductor can only lower it on weights it froze itself; a
    # compiled model should keep nn.Linear and set torch._inductor.config.freezing = True instead
    @untraced
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "bf16 kernel" and x.dtype == torch.bfloat16:
            y = gemm.bf16_gemm(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        if self.path == "bf16w kernel" and x.dtype in (torch.bfloat16, torch.float32):
            y = gemm.bf16w_gemm(x.reshape(-1, self.in_features), self.packed, self.bias, self.out_features)
            return y.view(*x.shape[:-1], self.out_features)
        # oneDNN in the dtype it was reordered in: the input's, or float32 for any input (the policy
        # for bf16 weights on CPUs without bf16 matmuls)
        if self.path == "oneDNN" and (x.dtype == self.packed.dtype or self.packed.dtype == torch.float32):
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.packed.dtype), self.packed, self.bias, "none", [None], "")
            return y.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dense_weight(self) -> torch.Tensor:
        """The plain [N, K] weight (rebuilt from the reordered one when that is all that is kept)."""
        if self.path.endswith("kernel"):
            return packing.unpack_bf16(self.packed, self.out_features)
        return self.weight if self.packed is None else self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.path}"


def speed_up_linears(model: nn.Module, skip: tuple[str, ...] = ("visual",), huge_pages: bool = True,
                     compute_dtype: torch.dtype | None = None, cache: PackedCache | None = None,
                     prefix: str = "") -> int:
    """Swap every nn.Linear of `model` for a FastLinear in place; returns how many were swapped.

    Modules whose qualified name starts with one of `skip` stay as they are: by default the
    vision tower (the CPU backend swaps it too, without huge pages: its GEMMs are compute-bound,
    and finding huge pages at load costs time). With a `cache` the packed weights come from its
    file where it has them, by name (`prefix` + the name in `model`).
    """
    def make(name: str, linear: nn.Linear) -> FastLinear:
        pack = packing.pack_bf16 if cache is None else lambda w, huge: cache.pack_bf16(prefix + name, w, huge)
        return FastLinear.from_linear(linear, huge_pages=huge_pages, compute_dtype=compute_dtype, pack=pack)

    return replace_linears(model, make, skip)
