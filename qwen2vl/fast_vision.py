"""The vision tower's elementwise ops in C kernels on the CPU, or Triton kernels on CUDA, swapped in
after loading (`speed_up_vision`), as fast_layers.py does for the text decoder.

Each block's attention and MLP are replaced by modules holding the same linears (same names, so
state_dict keys don't change) whose forward calls qwen2vl/backends/cpu/vision_ops.py: QuickGELU in
place on fc1's output, the 2-D rotary in place on q and k in the qkv output (no float32 copies),
and the attention's softmax in place on its scores. The kernels round where torch rounds, so the
tower's output equals the torch code's bit for bit (tests/test_vision_ops.py); other dtypes and
devices run the torch code. On CUDA, kernels/triton_vision_ops.py does QuickGELU and rotary with
the same signatures (the tower there is bound by launches: ~17 of a block's ~30 become 2) and
the attention stays SDPA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qwen2vl.attention import block_diagonal_attention
from qwen2vl.backends import ops_for as _ops_for
from qwen2vl.backends.cpu import vision_ops
from qwen2vl.backends.cuda import triton_kernels
from qwen2vl.vision import VisionAttention, VisionMlp


def cuda_vision_ops(device: torch.device):
    """kernels.triton_vision_ops where triton imports and its kernels agree with torch on `device`, else None."""
    return triton_kernels("triton_vision_ops", device)


def ops_for(x: torch.Tensor):
    """The module of vision kernels that takes activations like `x`, or None."""
    return _ops_for(x, vision_ops, "triton_vision_ops")


class FastVisionAttention(nn.Module):
    def __init__(self, attn: VisionAttention):
        super().__init__()
        self.num_heads, self.qkv, self.proj = attn.num_heads, attn.qkv, attn.proj

    def forward(self, x, cos, sin, cu_seqlens):
        if (ops := ops_for(x)) is None:
            return VisionAttention.forward(self, x, cos, sin, cu_seqlens)
        n = x.shape[0]
        qkv = self.qkv(x)  # [P, 3 * H * D]: q heads, then k heads, then v heads
        dim = qkv.shape[1] // (3 * self.num_heads)
        ops.rotary_(qkv, cos, sin, 2 * self.num_heads, dim)  # q and k, in place
        q, k, v = qkv.view(n, 3, self.num_heads, dim).unbind(1)
        # the CPU's matmul attention takes the C softmax; CUDA's SDPA has its own
        softmax = vision_ops.softmax_ if ops is vision_ops else torch.softmax
        out = block_diagonal_attention(q, k, v, cu_seqlens, softmax=softmax)
        return self.proj(out.reshape(n, -1))


class FastVisionMlp(nn.Module):
    def __init__(self, mlp: VisionMlp):
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2

    def forward(self, x):
        if (ops := ops_for(x)) is None:
            return VisionMlp.forward(self, x)
        return self.fc2(ops.quick_gelu_(self.fc1(x).contiguous()))


def speed_up_vision(model) -> bool:
    """Swap each vision block's attention and MLP for the fast ones where the kernels run here and
    the tower is bf16 (on the CPU, or on CUDA with Triton); returns whether it did."""
    kind = model.device.type
    kernels_here = (vision_ops.library() is not None if kind == "cpu"
                    else kind == "cuda" and cuda_vision_ops(model.device) is not None)
    if model.dtype != torch.bfloat16 or not kernels_here:
        return False
    for block in model.visual.blocks:
        block.attn, block.mlp = FastVisionAttention(block.attn), FastVisionMlp(block.mlp)
    return True
