"""Tiny GPTQ and AWQ checkpoints for the tests, and the reference they are checked against.

The packed tensors come from our packers, which test_gptq_format.py proves equal to the reference
libraries' own (gptqmodel's GPTQ packer, autoawq's GEMM packer) on the samples they packed in
tests/fixtures/gptq_awq/. The reference model is transformers' in float32 with every quantized
linear's weight replaced by its dequantized values (its GPTQ/AWQ kernels need CUDA).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen2vl.gptq import AWQ_ORDER, IntWeight, pack_gptq
from qwen2vl.quantize_cli import QUANTIZED, quantize_weight
from tests.helpers.checkpoints import build_reference, save_checkpoint

# which input each decoder linear reads: q/k/v one, gate/up another
INPUTS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
WIDE = dict(hidden_size=128, num_heads=8, intermediate_size=256, vocab_size=256)  # every K a multiple of 128


def pack_awq(w: IntWeight) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors (qweight [K, N/8], qzeros [G, N/8], scales [G, N] fp16) of a 4-bit IntWeight."""
    assert w.bits == 4 and w.perm is None
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)

    def words(v):  # [R, N] -> [R, N/8], value j of a word = column AWQ_ORDER[j] of its 8
        v = v.to(torch.int64).view(v.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
        u = (v << shifts).sum(-1)
        return (u - ((u >> 31) << 32)).to(torch.int32)

    return {"qweight": words(w.codes.T), "qzeros": words(w.zeros.T), "scales": w.scales.T.half().contiguous()}


def act_order(w: IntWeight, seed: int) -> tuple[IntWeight, torch.Tensor, torch.Tensor]:
    """An act-order (desc_act) checkpoint's linear made of `w`'s codes: input feature f gets column
    rank[f] of w, a random permutation, so the groups are shuffled among the features and g_idx[f] =
    rank[f] // group_size. Returns (its codes in feature order, g_idx, its dense weight)."""
    rank = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    shuffled = IntWeight(w.codes[:, rank].contiguous(), w.zeros, w.scales, w.group_size, w.bits)
    return shuffled, (rank // w.group_size).to(torch.int32), w.dequantize()[:, rank]


def quantized_checkpoint(folder: Path, method: str, bits: int, group: int, desc_act: bool = False,
                         fmt: str = "gptq", seed: int = 0):
    """Write a tiny checkpoint whose decoder linears are quantized (`method` gptq or awq) to `folder`;
    returns (folder, the transformers reference model with the dequantized weights, float32)."""
    hf = build_reference(seed=seed, tie=False, **WIDE)
    folder = save_checkpoint(hf, folder)
    state = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            hub = name.replace("model.language_model.", "model.")
            if not QUANTIZED.match(hub):
                continue
            w = quantize_weight(p, bits, group)
            fields, dense = pack_awq(w) if method == "awq" else pack_gptq(w, v1=fmt == "gptq"), w.dequantize()
            if desc_act:
                # linears on one input share their order, as GPTQ's (from that input's Hessian)
                layer, linear = int(hub.split(".")[2]), hub.split(".")[4]
                shuffled, g_idx, dense = act_order(w, seed=4 * layer + INPUTS[linear])
                fields = {**pack_gptq(shuffled, v1=fmt == "gptq"), "g_idx": g_idx}
            p.copy_(dense)
            state |= {hub.removesuffix("weight") + f: t for f, t in fields.items()}
    from safetensors.torch import load_file, save_file

    plain = load_file(str(folder / "model.safetensors"))
    plain = {k: v for k, v in plain.items() if not QUANTIZED.match(k)}
    save_file({**plain, **state}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group, "version": "gemm",
                                         "zero_point": True, "modules_to_not_convert": ["visual"]}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                         "desc_act": desc_act, "sym": False, "checkpoint_format": fmt}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, hf



def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of a - b relative to b's: how the logits tests state their tolerance."""
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
