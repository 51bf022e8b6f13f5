"""LLM on CPU in bf16 swaps the linears for FastLinears (our kernel or oneDNN), with the same answers."""

import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.backends.cpu.linear import FastLinear
from tests.helpers.checkpoints import tiny_checkpoint


def test_bf16_cpu_llm_uses_fast_linears_and_matches_plain_model():
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    model = llm.model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, FastLinear) and isinstance(layer.mlp.down_proj, FastLinear)
    assert isinstance(model.lm_head, FastLinear)
    assert isinstance(model.visual.blocks[0].attn.qkv, FastLinear)
    assert isinstance(model.visual.patch_embed.proj, FastLinear)

    from qwen2vl import Qwen2VL

    plain = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=torch.bfloat16)
    ids = llm.prompt([{"role": "user", "content": "Hello there, how are you?"}]).token_ids
    fast_logits, plain_logits = model.logits(torch.tensor(ids)), plain.logits(torch.tensor(ids))
    torch.testing.assert_close(fast_logits, plain_logits, rtol=0.02, atol=0.02 * plain_logits.abs().max().item())
    grid = torch.tensor([[1, 4, 6]])
    pixels = torch.randn(24, model.config.vision.patch_dim, generator=torch.Generator().manual_seed(0))
    # the tower's output is in its compute dtype: float32 on CPUs without bf16 matmuls (backends/cpu/backend.py)
    fast_vision, plain_vision = model.visual(pixels, grid).to(torch.bfloat16), plain.visual(pixels, grid)
    torch.testing.assert_close(fast_vision, plain_vision, rtol=0.02, atol=0.02 * plain_vision.abs().max().item())
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) >= 1


def test_float32_cpu_llm_keeps_plain_linears():
    llm = LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", kv_cache_gib=0.02)
    assert type(llm.model.model.layers[0].self_attn.qkv_proj) is torch.nn.Linear


def test_fused_qkv_gives_the_same_logits():
    from qwen2vl import Qwen2VL

    model = Qwen2VL.from_pretrained(tiny_checkpoint(), dtype=torch.float32)
    ids = torch.randint(0, 200, (17,), generator=torch.Generator().manual_seed(0))
    before = model.logits(ids)
    model.fuse_qkv()
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    torch.testing.assert_close(model.logits(ids), before, rtol=1e-5, atol=1e-5)
