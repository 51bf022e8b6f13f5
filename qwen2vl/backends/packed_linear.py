"""PackedIntLinear: a GPTQ/AWQ checkpoint's linear kept as its integer codes in GPTQ's packing, computed
by the CUDA backend's W4A16/W8A16 kernel (cuda/triton_int_gemm.py, whose doc gives the layout and why).

backends/repack.py builds one at load for every 4- or 8-bit weight whose groups the kernel tiles, where
that kernel loaded. The kernel comes in as a function, so this file, and repack.py with it, import no
Triton (the CPU never needs it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from qwen2vl.gptq import IntWeight, pack_rows, unpack_rows

GROUP_MULTIPLE = 16  # the kernel's groups are multiples of this many features (tl.dot's least K)


class PackedIntLinear(nn.Module):
    def __init__(self, qweight, scales, zeros, perm, bias, bits: int, group_size: int, gemm: Callable):
        super().__init__()
        self.register_buffer("qweight", qweight)  # int32 [K / (32 / bits), N]
        self.register_buffer("scales", scales)  # fp16 (float32 where the checkpoint's aren't fp16) [G, N]
        self.register_buffer("zeros", zeros)  # uint8 [G, N]
        self.register_buffer("perm", perm)  # int32 [K], act-order only: code column k is input feature perm[k]
        self.register_buffer("bias", bias)
        self.bits, self.group_size, self.gemm = bits, group_size, gemm
        self.out_features, self.in_features = qweight.shape[1], qweight.shape[0] * 32 // bits

    @staticmethod
    def takes(w: IntWeight) -> bool:
        return w.bits in (4, 8) and w.group_size % GROUP_MULTIPLE == 0

    @classmethod
    def from_int_weight(cls, w: IntWeight, bias: torch.Tensor | None, device: torch.device,
                        gemm: Callable) -> PackedIntLinear:
        """`w` packed on `device` (the codes go there as bytes and are packed there)."""
        assert cls.takes(w)
        fp16 = w.scales.half()
        scales = fp16 if torch.equal(fp16.float(), w.scales) else w.scales  # exact either way
        perm = None if w.perm is None else w.perm.to(device, torch.int32)
        return cls(pack_rows(w.codes.to(device).T, w.bits), scales.T.contiguous().to(device),
                   w.zeros.T.to(device, torch.uint8).contiguous(), perm,
                   None if bias is None else bias.to(device), w.bits, w.group_size, gemm)

    def int_weight(self) -> IntWeight:
        """The weight as gptq.IntWeight (codes in the kernel's column order): the reference it computes."""
        codes = unpack_rows(self.qweight, self.bits).T.to(torch.uint8).contiguous()
        perm = None if self.perm is None else self.perm.long()
        return IntWeight(codes, self.zeros.T.to(torch.int16).contiguous(), self.scales.T.float().contiguous(),
                         self.group_size, self.bits, perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = self.gemm(x2, self.qweight, self.scales, self.zeros, self.perm, self.bias, self.bits, self.group_size)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.bits}-bit, group={self.group_size}, "
                f"act-order={self.perm is not None}, bias={self.bias is not None}, W{self.bits}A16 kernel")
