"""The W4A16/W8A16 Triton kernel (qwen2vl/backends/cuda/triton_int_gemm.py) against the dequantized
weights, and the CUDA backend's repack of GPTQ/AWQ checkpoints onto it. Without a GPU the kernels run in
Triton's interpreter on the CPU (tests/conftest.py): the same kernel source and indexing, numpy's
arithmetic, so the CUDA backend itself can be run here on a CPU device."""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

triton = pytest.importorskip("triton")  # interpreted on the CPU: tests/conftest.py

from qwen2vl.backends import cuda as cuda_backend  # noqa: E402
from qwen2vl.backends.cuda import CudaBackend  # noqa: E402
from qwen2vl.backends.cuda import triton_int_gemm as kernel  # noqa: E402
from qwen2vl.backends.packed_linear import PackedIntLinear  # noqa: E402
from qwen2vl.backends.quant import Int4Linear  # noqa: E402
from qwen2vl.backends.repack import repack  # noqa: E402
from qwen2vl.gptq import IntWeight, QuantConfig, QuantizedLinear, unpack  # noqa: E402
from qwen2vl.model import Qwen2VL  # noqa: E402
from tests.helpers.gptq_checkpoints import quantized_checkpoint, relative_rms  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16


def randn(*shape, seed=0, dtype=BF16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def int_weight(n: int, k: int, bits: int, group: int, act_order: bool, seed: int = 0) -> IntWeight:
    """Random codes and zeros; power-of-two scales, so every weight is exact in bf16 too and the tensor-core
    path can be held to the same bound as the exact one."""
    g = torch.Generator().manual_seed(seed)
    top = 2**bits
    scales = 2.0 ** -torch.randint(3, 8, (n, k // group), generator=g).float()
    perm = torch.randperm(k, generator=g) if act_order else None
    return IntWeight(torch.randint(0, top, (n, k), generator=g, dtype=torch.uint8),
                     torch.randint(0, top, (n, k // group), generator=g).to(torch.int16), scales, group, bits, perm)


def assert_within(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias, weight_rounding: float) -> None:
    """y = x @ dense^T + bias up to: y's own rounding to 16 bits (under 2**-7 of |y|: the interpreter
    truncates), float32 sums, and `weight_rounding` of each |x * w| where the kernel rounds the weights."""
    x64, w64 = x.double().cpu(), dense.double().cpu()
    want = x64 @ w64.T + (0 if bias is None else bias.double().cpu())
    bound = 2**-7 * want.abs() + (weight_rounding + 2**-16) * (x64.abs() @ w64.abs().T) + 1e-6
    err = (y.double().cpu() - want).abs()
    assert y.dtype == x.dtype and bool((err <= bound).all()), f"off by {(err - bound).max().item():.3g} past the bound"


# bits, group, act-order, bias, rows, N, K: decode (<= 4 rows, CUDA cores, split along K) and prefill
# (tensor cores, two row blocks for 70); N never a multiple of the 64-wide tiles
CASES = [
    (4, 32, False, True, 1, 37, 256),
    (4, 128, False, False, 3, 64 + 5, 256),
    (4, 256, True, True, 1, 40, 256),  # one group per row, act-order
    (4, 64, True, False, 20, 37, 256),
    (4, 48, False, True, 2, 24, 240),  # a group that isn't a power of two: tiles of 16
    (8, 128, False, True, 1, 40, 256),  # Qwen's GPTQ-Int8 groups
    (8, 256, True, False, 70, 24, 256),
]


@pytest.mark.parametrize("bits, group, act_order, with_bias, rows, n, k", CASES)
def test_kernel_equals_the_dequantized_weights(bits, group, act_order, with_bias, rows, n, k):
    w = int_weight(n, k, bits, group, act_order)
    bias = randn(n, seed=1) if with_bias else None
    linear = PackedIntLinear.from_int_weight(w, bias, DEVICE, kernel.int_gemm)
    x = randn(rows, k, seed=2)
    assert_within(linear(x), x, w.dequantize(), bias, 0)


@pytest.mark.parametrize("split", [1, 3])
def test_decode_rows_split_along_k_or_not_and_fp16(split):
    w = int_weight(37, 256, 4, 32, act_order=True)
    bias = randn(37, seed=1, dtype=torch.float16)
    linear = PackedIntLinear.from_int_weight(w, bias, DEVICE, kernel.int_gemm)
    x = randn(2, 256, seed=2, dtype=torch.float16)
    y = kernel.int_gemm(x, linear.qweight, linear.scales, linear.zeros, linear.perm, bias, 4, 32, split=split)
    assert_within(y, x, w.dequantize(), bias, 0)


SAMPLES = load_file(str(Path(__file__).parent / "fixtures/gptq_awq/samples.safetensors"))


@pytest.mark.parametrize("name, method, bits, group", [
    ("gptq4_g64_desc", "gptq", 4, 64), ("gptq4_gall", "gptq", 4, -1), ("gptq8_g128", "gptq", 8, 128),
    ("gptq8_gall_asym", "gptq", 8, -1), ("awq4_g128", "awq", 4, 128),
])
def test_kernel_on_tensors_packed_by_gptqmodel_and_autoawq(name, method, bits, group):
    cfg = QuantConfig.parse({"quant_method": method, "bits": bits, "group_size": group})  # GPTQ: the v1 format
    fields = ("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales")
    tensors = {f: SAMPLES[f"{name}.{f}_v1" if f == "qzeros" and method == "gptq" else f"{name}.{f}"] for f in fields}
    bias = SAMPLES[f"{name}.bias"].to(BF16)
    linear = repack(QuantizedLinear(unpack(cfg, name, tensors, 256, 32), bias), BF16, DEVICE, name, kernel.int_gemm)
    assert isinstance(linear, PackedIntLinear) and linear.scales.dtype == torch.float16
    dense = SAMPLES[f"{name}.dequant"].float()  # the library's own dequantized weights, rounded to fp16
    for rows, weight_rounding in ((1, 2**-11), (9, 2**-7)):  # exact weights; rounded to bf16 for tl.dot
        x = randn(rows, 256, seed=rows)
        assert_within(linear(x.to(DEVICE)), x, dense, bias, weight_rounding + 2**-11)


def test_the_packing_keeps_every_code_and_scales_in_fp16_only_where_exact():
    w = int_weight(24, 128, 4, 32, act_order=True)
    w.scales[3, 1] = 2.0**-30  # under fp16's smallest
    linear = PackedIntLinear.from_int_weight(w, None, DEVICE, kernel.int_gemm)
    back = linear.int_weight()
    assert linear.scales.dtype == torch.float32 and linear.qweight.shape == (16, 24)
    for field in ("codes", "zeros", "scales", "perm"):
        assert torch.equal(getattr(back, field).cpu(), getattr(w, field)), field
    w.scales[3, 1] = 2.0**-10
    assert PackedIntLinear.from_int_weight(w, None, DEVICE, kernel.int_gemm).scales.dtype == torch.float16


def test_shapes_it_cannot_take_are_refused_naming_the_limit_and_repack_dequantizes_them(caplog):
    w = int_weight(16, 80, 4, 40, act_order=False)
    x = randn(1, 80)
    qweight = torch.zeros(10, 16, dtype=torch.int32, device=DEVICE)
    scales, zeros = torch.ones(2, 16, device=DEVICE), torch.zeros(2, 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="groups of a multiple of 16 features that divide in_features=80, not 40"):
        kernel.int_gemm(x, qweight, scales, zeros, None, None, 4, 40)
    with pytest.raises(ValueError, match="bfloat16 or float16 activations, not torch.float32"):
        kernel.int_gemm(x.float(), qweight, scales, zeros, None, None, 4, 80)
    with pytest.raises(ValueError, match="4-bit qweight \\(10, 16\\) doesn't hold in_features=96"):
        kernel.int_gemm(randn(1, 96), qweight, scales, zeros, None, None, 4, 16)
    with caplog.at_level(logging.WARNING, "qwen2vl.quant"):
        dense = repack(QuantizedLinear(w, None), BF16, DEVICE, "odd", kernel.int_gemm)
    assert type(dense) is nn.Linear and "odd: 4-bit weights in groups of 40 have no int kernel here" in caplog.text
    assert torch.equal(dense.weight, w.dequantize().to(DEVICE, BF16))


VARIANTS = {  # (method, bits, group, act-order, checkpoint format), as tests/test_gptq_model.py
    "gptq4-g128-v1": ("gptq", 4, 128, False, "gptq"),
    "gptq4-g32-act-order-v2": ("gptq", 4, 32, True, "gptq_v2"),
    "gptq8-g128": ("gptq", 8, 128, False, "gptq"),
    "awq4-g64": ("awq", 4, 64, False, ""),
}
IDS = torch.randint(0, 250, (24,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (folder, transformers' logits in float32 on the dequantized weights)}, built once."""
    out = {}
    for name, args in VARIANTS.items():
        folder, hf = quantized_checkpoint(tmp_path_factory.mktemp(name), *args[:4], fmt=args[4])
        with torch.no_grad():
            out[name] = folder, hf(input_ids=IDS[None]).logits[0].float()
    return out


def prepared(folder, monkeypatch, int_gemm_module):
    """The checkpoint through CudaBackend.prepare on DEVICE, with `int_gemm_module(name, device)` standing for
    triton_kernels("triton_int_gemm", ...) (the layer and vision kernels left out: their own tests)."""
    monkeypatch.setattr(cuda_backend, "triton_kernels",
                        lambda name, device: int_gemm_module(name, device) if name == "triton_int_gemm" else None)
    model = Qwen2VL.from_pretrained(folder, dtype=BF16, device=DEVICE)
    backend = CudaBackend(DEVICE)
    backend.prepare(model, None)
    return model, backend


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_cuda_backend_runs_every_decoder_linear_on_the_kernel(variant, checkpoints, monkeypatch):
    folder, reference = checkpoints[variant]
    model, backend = prepared(folder, monkeypatch, cuda_backend.triton_kernels)
    layer = model.model.layers[0]
    assert backend.int_gemm
    assert all(isinstance(m, PackedIntLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                        layer.mlp.gate_up_proj, layer.mlp.down_proj))
    with torch.no_grad():
        prefill = model.logits(IDS.to(DEVICE)).float().cpu()  # 24 rows: the tensor-core path
        first = model.logits(IDS[:1].to(DEVICE)).float().cpu()  # 1 row: the decode path, split along K
    # bf16 activations against float32: ~0.016 relative RMS on these random models (tests/test_gptq_model.py);
    # a wrong layout gives ~1
    assert relative_rms(prefill, reference) < 0.05 and relative_rms(first, reference[:1]) < 0.05


def test_without_triton_the_cuda_backend_keeps_the_dequantizing_linears_and_says_why(checkpoints, monkeypatch,
                                                                                     caplog):
    real_import = importlib.import_module

    def no_triton(name, *args):
        if name.endswith("triton_int_gemm"):
            raise ModuleNotFoundError("No module named 'triton'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_triton)
    fresh = functools.cache(cuda_backend.triton_kernels.__wrapped__)  # not the cached module of other tests
    folder, reference = checkpoints["gptq4-g128-v1"]
    with caplog.at_level(logging.WARNING, "qwen2vl.backends.cuda"):
        model, backend = prepared(folder, monkeypatch, fresh)
    assert "Triton kernels triton_int_gemm unavailable (ModuleNotFoundError: No module named 'triton')" in caplog.text
    assert not backend.int_gemm and isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    with torch.no_grad():
        assert relative_rms(model.logits(IDS.to(DEVICE)).float().cpu(), reference) < 0.05
