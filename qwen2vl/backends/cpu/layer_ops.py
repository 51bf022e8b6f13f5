"""ctypes bindings of layer_ops.c and paged_decode.c: a decoder layer's small bf16 ops (RMSNorm with
its residual add, rotary, SiLU * up, paged decode attention), one C call each instead of a few torch
ops each.

Built and loaded by native.py for this CPU's tier. `library()` is None where the kernels can't be
had (no compiler, a failed compile, a CPU without the features); native.py logs why, once, and
the CPU backend then leaves the torch code in place. The wrappers take bf16 CPU tensors with
contiguous rows (callers check `supports(x)` first).
"""

from __future__ import annotations

import torch

from qwen2vl.backends.cpu import native

MAX_GROUP, MAX_HEAD_DIM = 16, 256  # the attention kernel's stack buffers (MAXG, MAXD in paged_decode.c)


def library():
    """layer_ops.c loaded, or None where it can't be built or run here."""
    return native.library("layer_ops")


def attention_library():
    """paged_decode.c loaded, or None where it can't be built or run here."""
    return native.library("paged_decode")


def available() -> bool:
    return library() is not None and attention_library() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels take activations like `x` (bf16 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and available()


def supports_layout(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernels take these head sizes (paged_decode's stack buffers: MAXG, MAXD in paged_decode.c)."""
    return heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP and head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0


# Lean wrappers: a decode step calls them ~140 times, and each check or allocation here costs a
# fraction of a microsecond. Layouts fixed by the model (head sizes, weights) are checked once by
# the CPU backend's prepare; plain ctypes calls, which dynamo can't trace (TextModel.forward,
# their caller, is kept out of torch.compile as a whole).

def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual), x + residual) for contiguous x, residual [N, D]; with residual None,
    (RMSNorm(x), x). Fuses DecoderLayer's `x + sublayer(x)` into the RMSNorm that follows it. The
    results are new tensors: the caller's are left as they are."""
    assert x.is_contiguous()
    n, d = x.shape
    out = torch.empty_like(x)
    if residual is None:
        library().rms_norm(x.data_ptr(), None, None, weight.data_ptr(), out.data_ptr(), n, d, eps,
                           torch.get_num_threads())
        return out, x
    assert residual.is_contiguous()
    total = torch.empty_like(x)
    library().rms_norm(x.data_ptr(), residual.data_ptr(), total.data_ptr(), weight.data_ptr(), out.data_ptr(), n, d,
                       eps, torch.get_num_threads())
    return out, total


def rotary_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """apply_rotary in place on the first `heads` heads of each row of qkv [N, >= heads * head_dim]
    (the q and k heads of the fused qkv output, rows contiguous); cos, sin [N, head_dim] contiguous."""
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    library().rotary(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], heads, head_dim,
                     torch.get_num_threads())


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate, up [N, I] with contiguous rows (views of one gate|up output are
    fine) -> [N, I]."""
    assert gate.stride(1) == 1 and up.stride(1) == 1
    n, i = gate.shape
    out = torch.empty(n, i, dtype=gate.dtype)
    library().silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), n, i,
                       torch.get_num_threads())
    return out


def paged_decode(q, k, v, k_cache, v_cache, slot_mapping, ctx_slots, ctx_lens) -> torch.Tensor:
    """Write the new tokens' k, v [B, Hkv, D] to the cache slots slot_mapping [B] (KVCache.write), then
    attend q [B, Hq, D] (one token per sequence) over each sequence's ctx_lens[b] slots ctx_slots[b, :]
    of k_cache/v_cache [num_blocks, block_size, Hkv, D] -> [B, Hq, D] (paged_attention.decode).

    q, k, v: heads contiguous within a token (views of the qkv output are fine); the cache and the
    int64 slots and lengths as the runner builds them (ctx_slots rows contiguous)."""
    b, hq, d = q.shape
    out = torch.empty(b, hq, d, dtype=q.dtype)
    rc = attention_library().paged_decode(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
        v_cache.data_ptr(), slot_mapping.data_ptr(), ctx_slots.data_ptr(), ctx_slots.stride(0), ctx_lens.data_ptr(),
        out.data_ptr(), b, hq, k.shape[1], d, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("layer_ops.paged_decode: out of memory for the partial softmaxes")
    return out

