"""A whole model with int8 / int4 weights stays close to the same model in bf16, through LLM."""

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from tests.test_server_support import tiny_checkpoint

# measured on the tiny checkpoint (random weights): relative RMS of the logits vs bf16 is 0.025
# for int8 and 0.21 for int4; the bounds leave ~2x room and fail on a broken kernel (error ~1)
BOUNDS = {"int8": 0.06, "int4": 0.45}


@pytest.fixture(scope="module")
def prompt_ids():
    return torch.randint(0, 200, (40,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bf16_logits(prompt_ids):
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    return llm.model.logits(prompt_ids).float()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_close_to_bf16(mode, prompt_ids, bf16_logits):
    llm = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, quantization=mode)
    logits = llm.model.logits(prompt_ids).float()
    rel = ((logits - bf16_logits).pow(2).mean().sqrt() / bf16_logits.pow(2).mean().sqrt()).item()
    print(f"{mode}: relative RMS {rel:.4f}")
    assert rel < BOUNDS[mode], rel
    # decode through the engine (one row at a time: the decode kernels) agrees with a full forward
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt_ids.tolist()], params)[0].token_ids
    full = llm.model.logits(torch.tensor(prompt_ids.tolist() + out[:-1])).float()
    greedy_from_full = full[len(prompt_ids) - 1:].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(out, greedy_from_full))
    assert agree >= 5, (out, greedy_from_full)
