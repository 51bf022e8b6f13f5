"""`qwen2vl train --dtype`: auto (the default) computes in bf16 only where the device has bf16 matmuls in
hardware (a Zen 3 trained the demo 20x slower under bf16 autocast than in float32), an explicit bf16 on a
CPU without them runs with a warning, and auto's run is bit for bit the run of the dtype it picked."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.backends.cpu import isa
from qwen2vl.train import precision
from qwen2vl.train.cli import add_train_arguments
from qwen2vl.train.loop import TrainConfig, train
from tests.helpers.training import model_folder, sample_rows, write_jsonl

AVX2 = isa.capped({"avx2", "fma", "f16c", "bmi2"}, None)  # a Zen 3
ZEN5 = isa.capped({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}, None)
AMX = isa.capped({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "amx_tile", "amx_bf16",
                  "amx_int8"}, None)


@pytest.fixture
def cpu_is(monkeypatch):
    def use(cpu: isa.Isa) -> None:
        monkeypatch.setattr(precision.isa, "current", lambda: cpu)
    return use


@pytest.mark.parametrize("cpu, want", [(AVX2, "fp32"), (ZEN5, "bf16"), (AMX, "bf16")])
def test_auto_is_bf16_only_with_bf16_matmuls_in_hardware(cpu, want, cpu_is):
    cpu_is(cpu)
    said = []
    assert precision.training_dtype("auto", "cpu", said.append) == want
    assert precision.training_dtype("fp32", "cpu", said.append) == "fp32"
    assert said == []


def test_bf16_asked_on_a_cpu_without_bf16_matmuls_runs_with_a_warning(cpu_is):
    said = []
    cpu_is(ZEN5)
    assert precision.training_dtype("bf16", "cpu", said.append) == "bf16" and said == []
    cpu_is(AVX2)
    assert precision.training_dtype("bf16", "cpu", said.append) == "bf16"
    assert len(said) == 1 and "no bf16 matmuls" in said[0] and "--dtype fp32" in said[0]


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="auto, bf16, fp32.*'fp16'"):
        precision.training_dtype("fp16", "cpu")


def test_the_cli_defaults_to_auto():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--model", "m", "--data", "d.jsonl", "--output", "o"])
    assert args.dtype == "auto"
    assert TrainConfig(model="m", data="d", output="o").dtype == "auto"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_precision")
    model_folder(root / "base")
    return root, write_jsonl(root / "data.jsonl", sample_rows(root))


def run(root, data, name, dtype):
    lines = []
    cfg = TrainConfig(model=str(root / "base"), data=str(data), output=str(root / name), dtype=dtype, lr=1e-2,
                      lora_rank=4, lora_alpha=8, batch_size=2, steps=2, seed=3)
    out = train(cfg, log=lines.append)
    return load_file(str(out / "adapter_model.safetensors")), next(x for x in lines if x.startswith("training "))


@pytest.mark.parametrize("cpu, same_as", [(AVX2, "fp32"), (ZEN5, "bf16")])
def test_auto_trains_exactly_as_the_dtype_it_picked(cpu, same_as, setup, cpu_is):
    root, data = setup
    cpu_is(cpu)
    auto, said = run(root, data, f"auto-{same_as}", "auto")
    picked, _ = run(root, data, f"picked-{same_as}", same_as)
    other, _ = run(root, data, f"other-{same_as}", {"fp32": "bf16", "bf16": "fp32"}[same_as])
    assert f"{same_as} (auto) on cpu" in said
    assert auto.keys() == picked.keys()
    assert all(torch.equal(auto[k], picked[k]) for k in auto)
    assert not all(torch.equal(auto[k], other[k]) for k in auto)  # the two dtypes train apart: the test can tell
