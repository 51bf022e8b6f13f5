"""Whole tiny GPTQ and AWQ checkpoints (tests/helpers/gptq_checkpoints.py) through our loader: the logits
equal transformers' in float32 on the reference dequantized weights, the CPU backend repacks them into
our int kernels at every tier, and `qwen2vl quantize` writes checkpoints that load without quantizing
again."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import LLM, SamplingParams
from qwen2vl.backends import prepare
from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear
from qwen2vl.backends.repack import PermutedLinear
from qwen2vl.cli import main
from qwen2vl.gptq import QuantizedLinear
from qwen2vl.model import Qwen2VL
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.gptq_checkpoints import quantized_checkpoint, relative_rms
from tests.helpers.tiers import TIERS_HERE, at_tier

# (method, bits, group, act-order, checkpoint format) and the linear each decoder linear becomes
VARIANTS = {
    "gptq4-g128-v1": (("gptq", 4, 128, False, "gptq"), Int4Linear),
    "gptq4-g32-act-order-v2": (("gptq", 4, 32, True, "gptq_v2"), PermutedLinear),
    "gptq8-per-row": (("gptq", 8, -1, False, "gptq"), Int8Linear),
    "gptq8-g128": (("gptq", 8, 128, False, "gptq"), None),  # down_proj (K 256) in groups, the rest (K 128) per row
    "gptq8-g32-act-order-v2": (("gptq", 8, 32, True, "gptq_v2"), PermutedLinear),
    "awq4-g64": (("awq", 4, 64, False, ""), Int4Linear),
}
IDS = torch.randint(0, 250, (40,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (folder, transformers' logits in float32 on the dequantized weights)}, built once."""
    out = {}
    for name, (args, _) in VARIANTS.items():
        folder, hf = quantized_checkpoint(tmp_path_factory.mktemp(name), *args[:4], fmt=args[4])
        with torch.no_grad():
            out[name] = folder, hf(input_ids=IDS[None]).logits[0].float()
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_on_the_dequantized_weights(variant, checkpoints):
    folder, reference = checkpoints[variant]
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)  # no backend: QuantizedLinear's reference path
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14  # 7 per layer, nothing else
    with torch.no_grad():
        logits = model.logits(IDS)
    torch.testing.assert_close(logits, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())


@pytest.mark.parametrize("tier", TIERS_HERE)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_backend_runs_them_on_our_int_kernels_at_every_tier(variant, tier, checkpoints, caplog):
    folder, reference = checkpoints[variant]
    kind = VARIANTS[variant][1]
    with at_tier(tier), caplog.at_level(logging.WARNING, "qwen2vl.quant"):
        model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16)
        prepare(model)
        with torch.no_grad():
            logits = model.logits(IDS).float()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    if kind is None:  # 8 bits in groups of 128: where a group is a whole row Int8Linear, else Int8GroupLinear
        assert isinstance(attn.qkv_proj, Int8Linear) and isinstance(mlp.down_proj, Int8GroupLinear)
    else:
        assert all(isinstance(m, kind) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj))
    assert "dequantized" not in caplog.text
    # the int kernel quantizes activations to int8 per block of 32 (as our own int8/int4 do): measured
    # 0.016 (tier none: the bf16 rounding alone) to 0.027 relative RMS on these random models; a wrong
    # repack gives ~1
    print(f"{variant} {tier}: relative RMS {relative_rms(logits, reference):.4f}")
    assert relative_rms(logits, reference) < 0.05


@pytest.mark.parametrize("tier", TIERS_HERE)
def test_gptq_int8_in_groups_runs_in_float32_within_the_kernels_bound_at_every_tier(tier, checkpoints, caplog):
    """Qwen's GPTQ-Int8 layout (8 bits, groups of 128) in float32: no linear dequantized at load; the
    reference path (tier none: Int8GroupLinear dequantizes per call) within 1e-3 of transformers on the
    dequantized weights. The int kernels quantize activations to int8 per block of 32, as for our own
    int8/int4, so theirs is those kernels' bound (test_int_gemv.py checks their sums per linear)."""
    folder, reference = checkpoints["gptq8-g128"]
    with at_tier(tier), caplog.at_level(logging.WARNING, "qwen2vl.quant"):
        model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
        prepare(model)
        with torch.no_grad():
            logits = model.logits(IDS)
    assert "dequantized" not in caplog.text
    assert all(isinstance(layer.mlp.down_proj, Int8GroupLinear) for layer in model.model.layers)
    rel = relative_rms(logits, reference)
    print(f"gptq8-g128 float32 {tier}: relative RMS {rel:.2e}")
    if tier == "none":
        torch.testing.assert_close(logits, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    else:  # measured 0.022 at avx2 and avx512 (bf16: 0.027, the test above); a wrong repack gives ~1
        assert rel < 0.05


def test_a_quantized_checkpoint_refuses_quantizing_again_and_a_bad_config_names_its_field(checkpoints, tmp_path):
    folder, _ = checkpoints["gptq4-g128-v1"]
    model = Qwen2VL.from_pretrained(folder, dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized already"):
        prepare(model, "int8")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = (folder / "config.json").read_text()
    (bad / "config.json").write_text(config.replace('"bits": 4', '"bits": 2'))
    with pytest.raises(ValueError, match="quantization_config.bits 2"):
        Qwen2VL.from_pretrained(bad)
    (bad / "config.json").write_text(config)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(256, 128)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj has both a weight and quantized tensors"):
        Qwen2VL.from_pretrained(bad)


@pytest.mark.parametrize("method,kind", [("int4", Int4Linear), ("int8", Int8Linear)])
def test_quantize_command_writes_a_gptq_checkpoint_that_loads_without_quantizing(method, kind, tmp_path, capsys):
    out = tmp_path / method
    assert main(["quantize", str(tiny_checkpoint()), "--method", method, "--output", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"quantized   gptq {4 if method == 'int4' else 8}-bit" in printed and "weights as loaded" in printed
    bf16 = LLM(str(tiny_checkpoint()), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    llm = LLM(str(out), dtype="bfloat16", device="cpu", kv_cache_gib=0.02)
    assert isinstance(llm.model.model.layers[1].mlp.down_proj, kind)
    # the same bounds as our in-memory int8/int4 (test_quant_model.py)
    rel = relative_rms(llm.model.logits(IDS).float(), bf16.model.logits(IDS).float())
    assert rel < {"int4": 0.45, "int8": 0.06}[method], rel
    # decode through the engine (the decode kernels, one row at a time) agrees with a full forward
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = llm.generate([IDS.tolist()], params)[0].token_ids
    full = llm.model.logits(torch.tensor(IDS.tolist() + tokens[:-1])).float()
    assert sum(a == b for a, b in zip(tokens, full[len(IDS) - 1:].argmax(-1).tolist())) >= 5
