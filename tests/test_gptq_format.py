"""GPTQ and AWQ tensors against the reference libraries' own packing (tests/fixtures/gptq_awq/: packed by
gptqmodel 7.7.0 and autoawq 0.2.9): our unpacking gives their dequantized weights bit for bit, our
packers give their tensors bit for bit, the repack into our kernels' layouts keeps the weights exact,
and every variant we can't run is refused naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear
from qwen2vl.backends.repack import PermutedLinear, repack
from qwen2vl.gptq import IntWeight, QuantConfig, QuantizedLinear, pack_gptq, unpack
from tests.helpers.gptq_checkpoints import pack_awq
from tests.helpers.quant_checks import KERNEL_TIERS, quantize_activations
from tests.helpers.tiers import at_tier

SAMPLES = load_file(str(Path(__file__).parent / "fixtures/gptq_awq/samples.safetensors"))
K, N = 256, 32
GPTQ = {"gptq4_g128": (4, 128), "gptq4_g32_asym": (4, 32), "gptq4_g64_desc": (4, 64), "gptq4_gall": (4, -1),
        "gptq8_g128": (8, 128), "gptq8_gall_asym": (8, -1)}
AWQ = {"awq4_g128": 128, "awq4_g64": 64}


def gptq_sample(name: str, fmt: str) -> tuple[QuantConfig, dict]:
    bits, group = GPTQ[name]
    cfg = QuantConfig.parse({"quant_method": "gptq", "bits": bits, "group_size": group, "checkpoint_format": fmt})
    zeros = SAMPLES[f"{name}.qzeros_v1" if fmt == "gptq" else f"{name}.qzeros_v2"]
    return cfg, {"qweight": SAMPLES[f"{name}.qweight"], "qzeros": zeros, "scales": SAMPLES[f"{name}.scales"],
                 "g_idx": SAMPLES[f"{name}.g_idx"]}


def awq_sample(name: str) -> tuple[QuantConfig, dict]:
    cfg = QuantConfig.parse({"quant_method": "awq", "bits": 4, "group_size": AWQ[name], "version": "GEMM",
                             "zero_point": True})
    return cfg, {f: SAMPLES[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales")}


def sample(name: str, fmt: str = "gptq") -> IntWeight:
    cfg, tensors = gptq_sample(name, fmt) if name in GPTQ else awq_sample(name)
    return unpack(cfg, name, tensors, K, N)


@pytest.mark.parametrize("name,fmt", [(n, f) for n in GPTQ for f in ("gptq", "gptq_v2")] + [(n, "") for n in AWQ])
def test_unpacking_gives_the_reference_dequantized_weights_bit_for_bit(name, fmt):
    w = sample(name, fmt)
    # theirs is fp16 (fp16 scales times integers, rounded once); ours float32 exact, so rounded once
    assert torch.equal(w.dequantize().half(), SAMPLES[f"{name}.dequant"])
    assert torch.equal(w.zeros.float(), SAMPLES[f"{name}.zeros_in"])  # zeros of 0 too (v1 borrows for them)
    assert (w.perm is not None) == name.endswith("desc")


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("name", [n for n in GPTQ if not n.endswith("desc")])
def test_our_gptq_packer_writes_gptqmodels_tensors(name, fmt):
    _, theirs = gptq_sample(name, fmt)
    ours = pack_gptq(sample(name, fmt), v1=fmt == "gptq")
    for field in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(ours[field], theirs[field]), field


@pytest.mark.parametrize("name", list(AWQ))
def test_our_awq_packer_writes_autoawqs_tensors(name):
    _, theirs = awq_sample(name)
    ours = pack_awq(sample(name))
    for field in ("qweight", "qzeros", "scales"):
        assert torch.equal(ours[field], theirs[field]), field


@pytest.mark.parametrize("cfg,field", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size"),
    ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}, "pack_dtype"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "exl2", "bits": 4}, "quant_method"),
])
def test_unsupported_variants_are_refused_naming_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        QuantConfig.parse(cfg)


def test_mis_shaped_tensors_and_odd_g_idx_are_refused_naming_the_tensor():
    cfg, tensors = gptq_sample("gptq4_g128", "gptq")
    with pytest.raises(ValueError, match=r"gptq4_g128.qweight has shape \(16, 32\)"):
        unpack(cfg, "gptq4_g128", {**tensors, "qweight": tensors["qweight"][:16]}, K, N)
    with pytest.raises(ValueError, match="lacks qzeros"):
        unpack(cfg, "gptq4_g128", {"qweight": tensors["qweight"], "scales": tensors["scales"]}, K, N)
    uneven = torch.zeros(K, dtype=torch.int32)  # every feature in group 0: not groups of 128
    with pytest.raises(ValueError, match="g_idx doesn't give every group exactly group_size=128"):
        unpack(cfg, "gptq4_g128", {**tensors, "g_idx": uneven}, K, N)


def effective_weight(module) -> torch.Tensor:
    """The float32 [N, K] weight a repacked module computes with, in the input's feature order."""
    if isinstance(module, PermutedLinear):
        inner = effective_weight(module.linear)
        return torch.empty_like(inner).index_copy_(1, module.perm, inner)
    if isinstance(module, (Int4Linear, Int8Linear, Int8GroupLinear)):
        return module.dequantize(torch.float32)
    return module.weight.float()


# what each sample becomes: 4 bits in groups a multiple of 32 -> Int4Linear, 8 bits per row with zero 128
# -> Int8Linear, other 8 bits (in groups; per row but asymmetric) -> Int8GroupLinear
KINDS = {"gptq4_g128": Int4Linear, "gptq4_g32_asym": Int4Linear, "gptq4_g64_desc": Int4Linear,
         "gptq4_gall": Int4Linear, "gptq8_g128": Int8GroupLinear, "gptq8_gall_asym": Int8GroupLinear,
         "awq4_g128": Int4Linear, "awq4_g64": Int4Linear}


@pytest.mark.parametrize("tier", ["none", *KERNEL_TIERS])
@pytest.mark.parametrize("name", list(KINDS))
def test_repacked_linears_hold_the_checkpoint_weights_exactly_and_compute_with_them(name, tier, caplog):
    w, bias = sample(name), SAMPLES[f"{name}.bias"].float()
    reference = SAMPLES[f"{name}.dequant"]
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    with at_tier(tier):
        module = repack(QuantizedLinear(w, bias), torch.float32, torch.device("cpu"), name)
        inner = module.linear if isinstance(module, PermutedLinear) else module
        assert type(inner) is KINDS[name] and isinstance(module, PermutedLinear) == name.endswith("desc")
        assert torch.equal(effective_weight(module).half(), reference)
        assert torch.equal(effective_weight(module), w.dequantize())  # float32, exact: scales stayed float32
        y = module(x)
    exact = F.linear(x.double(), w.dequantize().double(), bias.double())
    # int_gemv quantizes x per block of 32: bound that error (Int8GroupLinear runs it at every kernel tier)
    if getattr(inner, "blocked", tier != "none"):
        xp = x[:, module.perm] if isinstance(module, PermutedLinear) else x
        _, d, _ = quantize_activations(xp)
        w_part = effective_weight(inner).double().abs()  # int4: (q - 8) * s + z; |w| bounds what x's error meets
        if isinstance(inner, (Int4Linear, Int8GroupLinear)):  # z meets the exact sum of x: only q * s counts
            q, scales, _ = inner.unpack()
            q = q.double() - 8 if isinstance(inner, Int4Linear) else q.double()
            w_part = (q * scales.double().repeat_interleave(inner.group_size, 1)).abs()
        bound = (d.repeat_interleave(32, 1) / 2) @ w_part.T + 1e-4 * exact.abs() + 1e-5
        assert ((y.double() - exact).abs() <= bound).all()
    else:
        torch.testing.assert_close(y.double(), exact, rtol=1e-4, atol=1e-4)
    assert "dequantized" not in caplog.text


@pytest.mark.parametrize("bits", [4, 8])
def test_groups_no_kernel_takes_are_dequantized_once_and_logged(bits, caplog):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2**bits, (N, K), generator=g).to(torch.uint8)
    zeros = torch.randint(0, 2**bits, (N, K // 16), generator=g).to(torch.int16)
    w = IntWeight(codes, zeros, torch.rand(N, K // 16, generator=g) / 64, 16, bits)  # groups of 16: under 32
    module = repack(QuantizedLinear(w, None), torch.float32, torch.device("cpu"), "odd")
    assert type(module) is torch.nn.Linear and torch.equal(module.weight, w.dequantize())
    assert f"odd: {bits}-bit weights in groups of 16 have no int kernel here; dequantized" in caplog.text
