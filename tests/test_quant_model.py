"""A whole model with int8 / int4 weights stays close to the same model in bf16, through LLM."""

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from tests.helpers.checkpoints import tiny_checkpoint

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


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """hidden 128, intermediate 256: every in_features is a multiple of 128, so all int4 groups tile."""
    from tests.helpers.checkpoints import build_reference, save_checkpoint
    from tests.helpers.qwen_tokenizer import qwen_tokenizer_dir

    hf = build_reference(hidden_size=128, num_heads=8, intermediate_size=256, vocab_size=151936)
    return save_checkpoint(hf, tmp_path_factory.mktemp("wide"), tokenizer_dir=qwen_tokenizer_dir())


def test_int4_group_sizes_reach_the_linears_and_trade_error(wide_checkpoint, prompt_ids):
    from qwen2vl.backends.quant import QUANTIZATIONS, Int4Linear

    def logits(**kw):
        llm = LLM(str(wide_checkpoint), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, **kw)
        return llm, llm.model.logits(prompt_ids).float()

    _, bf16 = logits()
    errors = {}
    for mode in ["int4", "int4-g64", "int4-g128"]:
        llm, got = logits(quantization=mode)
        groups = {m.group_size for m in llm.model.modules() if isinstance(m, Int4Linear)}
        assert groups == {QUANTIZATIONS[mode][1]}
        errors[mode] = ((got - bf16).pow(2).mean().sqrt() / bf16.pow(2).mean().sqrt()).item()
    print(errors)
    # bigger groups: fewer scales, more error (measured 0.30 / 0.36 / 0.41); a broken kernel gives ~1
    assert errors["int4"] < errors["int4-g64"] < errors["int4-g128"] < 0.65, errors


def test_bad_quantization_names_and_groups_are_refused():
    with pytest.raises(ValueError, match="int4-g128"):  # the message lists what is accepted
        LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, quantization="int3")
    with pytest.raises(ValueError, match="groups of 128 don't tile in_features=64"):
        LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02, quantization="int4-g128")
