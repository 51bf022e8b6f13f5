"""Checks shared by the CPU (C) and CUDA (Triton) kernel tests, decoder and vision tower: both
modules take the same arguments and must give the torch code's bits where they claim to."""

import torch

from qwen2vl.rotary import apply_rotary, mrope_cos_sin


def assert_rotary_in_place_equals_apply_rotary(rotary_, n: int, heads: int, kv_heads: int, dim: int, device="cpu"):
    """rotary_(qkv, cos, sin, heads + kv_heads, dim) turns q and k of a fused qkv output in place
    exactly as apply_rotary does, and leaves v alone."""
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(torch.bfloat16).to(device)
    positions = torch.randint(0, 4000, (3, n), generator=torch.Generator().manual_seed(5)).to(device)
    cos, sin = mrope_cos_sin(positions, dim, 1e6, (dim // 8, dim // 8, dim // 2 - dim // 4), torch.bfloat16)
    qk = (heads + kv_heads) * dim
    want = apply_rotary(qkv[:, :qk].view(n, heads + kv_heads, dim), cos, sin).reshape(n, qk)
    got = qkv.clone()
    rotary_(got, cos, sin, heads + kv_heads, dim)
    assert torch.equal(got[:, :qk], want)
    assert torch.equal(got[:, qk:], qkv[:, qk:])  # v untouched


def assert_vision_rotary_equals_apply_rotary_in_float32(rotary_, n: int, heads: int, dim: int, device="cpu",
                                                        dtype=torch.bfloat16):
    """rotary_(qkv, cos, sin, 2 * heads, dim) turns q and k of the vision tower's [q | k | v] output in
    place exactly as `apply_rotary(x.float(), cos, sin).to(dtype)` does, and leaves v alone."""
    def randn(*shape, seed, dtype=dtype):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)

    qkv = randn(n, 3 * heads * dim, seed=1)
    cos, sin = randn(n, dim, seed=2, dtype=torch.float32), randn(n, dim, seed=3, dtype=torch.float32)
    got = qkv.clone()
    rotary_(got, cos, sin, 2 * heads, dim)
    for i in (0, 1):  # q and k turned, v untouched
        want = apply_rotary(qkv.view(n, 3, heads, dim)[:, i].float(), cos, sin).to(dtype)
        assert torch.equal(got.view(n, 3, heads, dim)[:, i], want)
    assert torch.equal(got.view(n, 3, heads, dim)[:, 2], qkv.view(n, 3, heads, dim)[:, 2])
