"""One full training step on a Qwen2.5-VL checkpoint against transformers in float32: the loss and every
gradient, the windowed vision tower's included (tests/test_train_parity.py's step, another family)."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.processing.processor import Processor
from qwen2vl.train.data import read_rows
from qwen2vl.train.setup import load_for_training
from tests.helpers.training import hf_name, hf_step, model_folder, our_step, sample_rows, write_image, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train25")
    hf = model_folder(folder, family="qwen2_5_vl", vision_depth=3, window_size=56, fullatt=(1,))
    rows = sample_rows(folder)
    write_image(folder / "big.png", 3, 168, 112)  # 4 x 6 merged tokens: several windows of 2 x 2
    rows.append({"messages": [{"role": "user", "content": "<image>Where?"},
                              {"role": "assistant", "content": "Top left."}], "images": ["big.png"]})
    return folder, hf, Processor.from_pretrained(folder), read_rows(write_jsonl(folder / "data.jsonl", rows))


def test_full_step_matches_transformers(setup):
    folder, hf, processor, rows = setup
    model = load_for_training(folder, dtype=torch.float32, device="cpu", full=True, train_vision=True)
    assert model.config.model_type == "qwen2_5_vl"
    loss, _ = our_step(model, processor, rows)
    hf.train()
    hf.zero_grad()
    for p in hf.parameters():
        p.requires_grad_(True)
    torch.testing.assert_close(loss, hf_step(hf, processor, rows, model.config), rtol=1e-5, atol=1e-5)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[hf_name(name)].grad.reshape(p.grad.shape), rtol=1e-4, atol=1e-6,
                                   msg=name)
    assert len(dict(model.named_parameters())) == len(theirs)
