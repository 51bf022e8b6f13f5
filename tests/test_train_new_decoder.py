"""`qwen2vl train --full --init-random decoder`: a new decoder taught to read a checkpoint's trained vision
tower (the tower kept as it is, the decoder, embeddings and head initialised as transformers does)."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.train.cli import add_train_arguments, config_from_args
from qwen2vl.train.loop import TrainConfig, train
from qwen2vl.train.setup import load_for_training
from tests.helpers.training import model_folder, sample_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_decoder")
    model_folder(root / "base", tie=True)
    return root, write_jsonl(root / "data.jsonl", sample_rows(root))


def test_the_tower_is_kept_and_the_decoder_is_new(setup):
    root, _ = setup
    base = load_file(str(root / "base" / "model.safetensors"))
    model = load_for_training(root / "base", dtype=torch.float32, device="cpu", full=True, train_vision=False,
                              init_random="decoder")
    ours = model.state_dict()
    visual = [k for k in base if k.startswith("visual.")]
    assert visual and all(torch.equal(ours[k].flatten(), base[k].float().flatten()) for k in visual)  # conv as linear
    assert not any(p.requires_grad for p in model.visual.parameters())
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed and embed.requires_grad
    assert abs(embed.std().item() - 0.02) < 0.002 and not torch.equal(embed, base["model.embed_tokens.weight"].float())
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not layer.self_attn.q_proj.bias.any()
    assert abs(layer.mlp.down_proj.weight.std().item() - 0.02) < 0.002


def test_a_run_from_a_new_decoder_learns_and_writes_the_tower_unchanged(setup):
    root, data = setup
    lines = []
    out = train(TrainConfig(model=str(root / "base"), data=str(data), output=str(root / "run"), full=True,
                            init_random="decoder", lr=3e-3, batch_size=4, steps=4, dtype="fp32"), log=lines.append)
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in lines if line.startswith("step ")]
    assert losses[-1] < losses[0] - 0.5, losses
    base, written = load_file(str(root / "base" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[k].float(), base[k].float()) for k in base if k.startswith("visual."))
    assert not torch.equal(written["model.norm.weight"].float(), base["model.norm.weight"].float())


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(["--model", "m", "--data", "d.jsonl", "--output", "o", *argv]))


def test_the_flag_alone_still_means_every_weight():
    assert parse("--full", "--init-random").init_random == "all"
    assert parse("--full", "--init-random", "decoder").init_random == "decoder"
    assert parse("--full").init_random == ""
    with pytest.raises(ValueError, match="--init-vision-scale needs --init-random"):
        parse("--full", "--init-random", "decoder", "--init-vision-scale", "0.1")
    with pytest.raises(ValueError, match="init_random is"):
        train(TrainConfig(model="m", data="d", output="o", full=True, init_random=True))
