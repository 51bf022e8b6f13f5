"""GPTQ and AWQ checkpoints: their `quantization_config`, and their packed tensors read into integer codes.

A published quantized checkpoint (Qwen2-VL-*-Instruct-GPTQ-Int4/-Int8, -AWQ) keeps each quantized
linear as three or four tensors instead of `weight`, and leaves the rest (embeddings, norms, the
vision tower, lm_head, AWQ's `modules_to_not_convert`) as plain fp16/bf16 tensors. Both formats
store w = (q - zero) * scale per group of `group_size` input features, with integer codes q and
integer zero points, in int32 words of 32 / bits values:

  GPTQ  qweight [K * bits / 32, N]  values packed along the input rows (value j of a word at bits j*b)
        qzeros  [G, N * bits / 32]  packed along the output columns; the "gptq" (v1) checkpoint
                                    format, auto-gptq's and Qwen's, stores zero - 1 ("gptq_v2": the
                                    zero), subtracted from the whole int32 word as gptqmodel does, so
                                    a zero of 0 borrows from the next value and adding back undoes it
        scales  [G, N] fp16
        g_idx   [K]                 the group of each input feature (act-order, `desc_act`, shuffles it)
  AWQ   qweight [K, N * bits / 32]  packed along the output columns, the 8 values of a word in the
        qzeros  [G, N * bits / 32]  interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (autoawq's GEMM version)
        scales  [G, N] fp16

`IntWeight` is the format-free result: codes [N, K], integer zeros and float32 scales [N, G], and
for act-order the permutation of input features that makes the groups contiguous. The backends
repack it into their kernels' layouts (backends/repack.py); `QuantizedLinear` holds it in the model
between loading and that repack. The reference code these follow: gptqmodel 7.7.0's
`PackedGroupedQuantLinear.pack_original` / `dequantize_weight` and autoawq 0.2.9's
`WQLinear_GEMM.from_linear` / `dequantize_gemm` (tests/fixtures/gptq_awq/ holds tensors they packed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value j of an AWQ word is column AWQ_ORDER[j] of its 8
PACKED_FIELDS = ("qweight", "qzeros", "scales", "g_idx")  # the tensors a quantized linear has instead of weight


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" or "awq"
    bits: int
    group_size: int  # -1: one group per row
    v1_zeros: bool  # GPTQ's v1 format: the words of qzeros hold zero - 1 in each value

    @classmethod
    def from_folder(cls, folder: Path) -> QuantConfig | None:
        """The checkpoint's quantization (config.json's `quantization_config`, or an old-style
        quantize_config.json next to it); None for a plain checkpoint."""
        cfg = json.loads((folder / "config.json").read_text()).get("quantization_config")
        if cfg is None and (folder / "quantize_config.json").is_file():
            cfg = json.loads((folder / "quantize_config.json").read_text())
        return None if cfg is None else cls.parse(cfg)

    @classmethod
    def parse(cls, cfg: dict) -> QuantConfig:
        """Validate a `quantization_config`; every variant we can't run is an error naming its field."""
        method = str(cfg.get("quant_method", "")).lower()
        if method == "gptq":
            bits, group = cfg.get("bits"), cfg.get("group_size", 128)
            fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise ValueError(f"quantization_config.checkpoint_format {fmt!r} is not supported: only 'gptq' "
                                 "(v1, zero points stored minus one) and 'gptq_v2'")
            if str(cfg.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
                raise ValueError(f"quantization_config.pack_dtype {cfg['pack_dtype']!r} is not supported: only int32")
            v1 = fmt == "gptq"
        elif method == "awq":
            bits, group = cfg.get("bits", cfg.get("w_bit")), cfg.get("group_size", cfg.get("q_group_size", 128))
            version = str(cfg.get("version", "gemm")).lower()
            if version != "gemm":
                raise ValueError(f"quantization_config.version {version!r} is not supported: only AWQ's 'gemm' "
                                 "layout (the published Qwen2-VL AWQ checkpoints)")
            if not cfg.get("zero_point", True):
                raise ValueError("quantization_config.zero_point false (symmetric AWQ) is not supported")
            v1 = False
        else:
            raise ValueError(f"quantization_config.quant_method {cfg.get('quant_method')!r} is not supported: "
                             "only 'gptq' and 'awq'")
        if bits not in ((4, 8) if method == "gptq" else (4,)):
            raise ValueError(f"quantization_config.bits {bits!r} is not supported for {method}: "
                             f"{'4 or 8' if method == 'gptq' else 'only 4'}")
        if not isinstance(group, int) or not (group == -1 or group > 0):
            raise ValueError(f"quantization_config.group_size {group!r} must be a positive integer or -1")
        return cls(method, bits, group, v1)


@dataclass
class IntWeight:
    """One quantized linear's weight, format-free: w[n, perm[k]] = (codes[n, k] - zeros[n, g]) * scales[n, g]
    with g = k // group_size (perm None: the identity)."""

    codes: torch.Tensor  # uint8 [N, K], in 0 .. 2**bits - 1
    zeros: torch.Tensor  # int16 [N, G], in 0 .. 2**bits - 1
    scales: torch.Tensor  # float32 [N, G]
    group_size: int
    bits: int
    perm: torch.Tensor | None = None  # int64 [K]: column k of codes multiplies input feature perm[k]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] in the input's own feature order. Exact: a code minus a zero is an integer of
        at most 9 bits and the checkpoints' scales are 16-bit floats, so every product fits float32's
        mantissa."""
        per_k = lambda t: t.float().repeat_interleave(self.group_size, 1)
        w = (self.codes.float() - per_k(self.zeros)) * per_k(self.scales)
        if self.perm is None:
            return w
        return torch.empty_like(w).index_copy_(1, self.perm, w)

    @staticmethod
    def cat(parts: list[IntWeight]) -> IntWeight:
        """The weights of linears on the same input stacked along N (q/k/v fused)."""
        first = parts[0]
        perms = [p.perm for p in parts]
        same_perm = all(q is None for q in perms) or all(q is not None and torch.equal(q, perms[0]) for q in perms)
        if not same_perm:  # GPTQ orders features by the Hessian of their shared input: one order for all
            raise ValueError("linears on the same input (q/k/v or gate/up) have different act-order g_idx; "
                             "GPTQ gives them one order")
        if any((p.group_size, p.bits) != (first.group_size, first.bits) for p in parts):
            raise ValueError("linears on the same input (q/k/v or gate/up) are quantized with different "
                             "bits or group sizes")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        return IntWeight(cat("codes"), cat("zeros"), cat("scales"), first.group_size, first.bits, first.perm)


def _ones(bits: int) -> int:
    """A word with 1 in each of its 32 / bits values: what GPTQ's v1 format takes off its zero words."""
    return sum(1 << s for s in range(0, 32, bits))


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    return words.long() & 0xFFFFFFFF


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding 32 / bits values per word (value j at bits j*bits) -> [R * 32/bits, C]."""
    shifts = torch.arange(0, 32, bits)
    v = (_unsigned(words)[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)  # [R, 32/bits, C]
    return v.reshape(-1, words.shape[1])


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the int32 words with those bits."""
    return (v - ((v >> 31) << 32)).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_rows: [R * 32/bits, C] values in 0 .. 2**bits - 1 -> int32 [R, C], value j of
    word r the row r * 32/bits + j (GPTQ's qweight packing along the input features)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    v = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    return _as_int32((v << shifts[None, :, None]).sum(1))


def _unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] (or their unsigned values) -> [R, C * 32/bits], the values of each word side by side."""
    shifts = torch.arange(0, 32, bits)
    return ((_unsigned(words)[:, :, None] >> shifts) & (2**bits - 1)).reshape(words.shape[0], -1)


def _check(name: str, t: torch.Tensor, shape: tuple, dtype=None) -> None:
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        want = f"{shape}" if dtype is None else f"{shape} {dtype}"
        raise ValueError(f"{name} has shape {tuple(t.shape)} {t.dtype}, expected {want}")


def _groups(k: int, group_size: int) -> int:
    group = k if group_size == -1 else group_size
    if k % group:
        raise ValueError(f"quantization_config.group_size {group_size} doesn't divide in_features={k}")
    return group


def unpack(cfg: QuantConfig, name: str, t: dict[str, torch.Tensor], k: int, n: int) -> IntWeight:
    """The packed tensors `t` (qweight, qzeros, scales, maybe g_idx) of linear `name` [N=n, K=k]."""
    missing = [f for f in PACKED_FIELDS[:3] if f not in t]
    if missing:
        raise ValueError(f"quantized linear {name} lacks {', '.join(missing)}")
    bits, per_word = cfg.bits, 32 // cfg.bits
    group = _groups(k, cfg.group_size)
    g = k // group
    if k % per_word or n % per_word:
        raise ValueError(f"{name}: in_features {k} and out_features {n} must be multiples of {per_word}")
    _check(f"{name}.scales", t["scales"], (g, n))
    if cfg.method == "gptq":
        _check(f"{name}.qweight", t["qweight"], (k // per_word, n), torch.int32)
        _check(f"{name}.qzeros", t["qzeros"], (g, n // per_word), torch.int32)
        codes = unpack_rows(t["qweight"], bits).T
        zero_words = _unsigned(t["qzeros"])
        zeros = _unpack_cols((zero_words + _ones(bits)) & 0xFFFFFFFF if cfg.v1_zeros else zero_words, bits)
    else:
        _check(f"{name}.qweight", t["qweight"], (k, n // per_word), torch.int32)
        _check(f"{name}.qzeros", t["qzeros"], (g, n // per_word), torch.int32)
        undo = torch.tensor(AWQ_ORDER).argsort()  # position of column c's value within its word
        unorder = lambda v: v.view(v.shape[0], -1, per_word)[:, :, undo].reshape(v.shape[0], -1)
        codes = unorder(_unpack_cols(t["qweight"], bits)).T
        zeros = unorder(_unpack_cols(t["qzeros"], bits))
    codes = codes.to(torch.uint8).contiguous()
    zeros = zeros.to(torch.int16).T.contiguous()
    perm = None
    if "g_idx" in t:
        g_idx = t["g_idx"].long()
        _check(f"{name}.g_idx", g_idx, (k,))
        # act-order: sorting the features by group makes each group contiguous, as our kernels want
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k) // group):
            raise ValueError(f"{name}.g_idx doesn't give every group exactly group_size={group} features")
        if torch.equal(perm, torch.arange(k)):
            perm = None
        else:
            codes = codes[:, perm].contiguous()
    return IntWeight(codes, zeros, t["scales"].float().T.contiguous(), group, bits, perm)


def pack_gptq(w: IntWeight, v1: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors (qweight, qzeros, scales fp16, g_idx) of an IntWeight without act-order; the
    inverse of `unpack`, checked equal to gptqmodel's packer on its own samples."""
    assert w.perm is None and w.bits in (4, 8)
    k = w.shape[1]
    per_word, shifts = 32 // w.bits, torch.arange(0, 32, w.bits, dtype=torch.int64)
    zeros = w.zeros.T.to(torch.int64)
    qzeros = (zeros.reshape(zeros.shape[0], -1, per_word) << shifts).sum(-1)
    if v1:  # zero - 1 in each value, taken off the whole word (gptqmodel's convert_gptq_v2_to_v1_format)
        qzeros = (qzeros - _ones(w.bits)) & 0xFFFFFFFF
    g_idx = torch.arange(k, dtype=torch.int32) // w.group_size
    return {"qweight": pack_rows(w.codes.T, w.bits), "qzeros": _as_int32(qzeros),
            "scales": w.scales.T.half().contiguous(), "g_idx": g_idx}


def weights_in(name: str, shape: list[int], cfg: QuantConfig | None) -> int:
    """How many weights a checkpoint tensor stands for: a qweight's words hold 32 / bits each, and
    qzeros/scales/g_idx are none (they belong to the qweight's)."""
    field, n = name.rpartition(".")[2], prod(shape)
    if cfg is None or field not in PACKED_FIELDS:
        return n
    return n * 32 // cfg.bits if field == "qweight" else 0


class QuantizedLinear(nn.Module):
    """A checkpoint's quantized linear, as loaded: until a backend repacks it into its kernel's layout
    (backends/repack.py) it computes with the dequantized weight, the reference for those kernels."""

    def __init__(self, weight: IntWeight, bias: torch.Tensor | None):
        super().__init__()
        self.int_weight = weight
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.int_weight.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        w = self.int_weight
        return (f"in={self.in_features}, out={self.out_features}, {w.bits}-bit, group={w.group_size}, "
                f"act-order={w.perm is not None}")
