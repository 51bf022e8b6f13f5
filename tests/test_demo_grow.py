"""`python -m qwen2vl.demo.grow` and `qwen2vl train --full --train-layers`: new decoder layers on top of a
checkpoint answer as the checkpoint does until trained, and a run that trains them changes nothing else."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.demo.grow import grow, main
from qwen2vl.model import Qwen2VL
from qwen2vl.train.cli import add_train_arguments, config_from_args
from qwen2vl.train.loop import TrainConfig, train
from tests.helpers.training import model_folder, sample_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    model_folder(root / "base", tie=True)
    grow(root / "base", root / "grown", layers=2, seed=3, dtype=torch.float32)
    grow(root / "base", root / "below", layers=2, seed=3, dtype=torch.float32, below=True)
    return root, write_jsonl(root / "data.jsonl", sample_rows(root))


@pytest.mark.parametrize("below", [False, True], ids=["after", "below"])
def test_the_grown_checkpoint_has_more_layers_and_the_same_logits(setup, below):
    root, _ = setup
    base_layers = Qwen2VLConfig.from_pretrained(root / "base").text.num_hidden_layers
    folder = root / ("below" if below else "grown")
    assert Qwen2VLConfig.from_pretrained(folder).text.num_hidden_layers == base_layers + 2
    base = Qwen2VL.from_pretrained(root / "base", dtype=torch.float32, device="cpu")
    grown = Qwen2VL.from_pretrained(folder, dtype=torch.float32, device="cpu")
    new, kept = (range(2), range(2, base_layers + 2)) if below else (range(base_layers, base_layers + 2),
                                                                      range(base_layers))
    for i in new:
        layer = grown.model.layers[i]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std() > 0.01  # the other weights drawn, so that training moves them
    for old, i in zip(base.model.layers, kept, strict=True):
        assert torch.equal(old.mlp.up_proj.weight, grown.model.layers[i].mlp.up_proj.weight)
    ids = torch.arange(10, 40)
    torch.testing.assert_close(grown.logits(ids), base.logits(ids), rtol=0, atol=0)


def test_training_the_new_layers_changes_them_alone(setup):
    root, data = setup
    out = train(TrainConfig(model=str(root / "grown"), data=str(data), output=str(root / "run"), full=True,
                            train_layers=[2, 3], lr=1e-2, batch_size=2, steps=2, dtype="fp32"), log=lambda _: None)
    before, after = load_file(str(root / "grown" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in changed), changed
    assert "model.layers.3.mlp.down_proj.weight" in changed


def test_bad_layers_are_refused(setup, tmp_path):
    root, data = setup
    with pytest.raises(ValueError, match="--train-layers: the decoder has layers 0-3, not 4"):
        train(TrainConfig(model=str(root / "grown"), data=str(data), output=str(tmp_path / "r"), full=True,
                          train_layers=[4], steps=1, dtype="fp32"), log=lambda _: None)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    common = ["--model", "m", "--data", "d", "--output", "o", "--train-layers", "2-3"]
    with pytest.raises(ValueError, match="--train-layers needs --full"):
        config_from_args(parser.parse_args(common))
    with pytest.raises(ValueError, match="--train-layers trains those decoder layers and nothing else"):
        config_from_args(parser.parse_args(common + ["--full", "--train-vision"]))
    assert config_from_args(parser.parse_args(common + ["--full"])).train_layers == [2, 3]
    with pytest.raises(SystemExit):
        main([str(root / "base"), str(tmp_path / "g"), "--layers", "0"])
