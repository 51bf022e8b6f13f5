"""One training step against transformers (+ PEFT for LoRA) in float32: the loss and every gradient of
a packed batch with images, text and multi-turn answers, built by our data code and fed identically to
both (the same ids, labels and pixels)."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.adapter import peft_key
from qwen2vl.processing.processor import Processor
from qwen2vl.train.data import read_rows
from qwen2vl.train.lora import lora_modules
from qwen2vl.train.setup import load_for_training
from tests.helpers.training import hf_name, hf_step, model_folder, our_step, sample_rows, write_jsonl

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_parity")
    hf = model_folder(folder)
    data = write_jsonl(folder / "data.jsonl", sample_rows(folder))
    processor = Processor.from_pretrained(folder)
    return folder, hf, processor, read_rows(data)


def test_full_step_matches_transformers(setup):
    folder, hf, processor, rows = setup
    model = load_for_training(folder, dtype=torch.float32, device="cpu", full=True, train_vision=True)
    loss, batch = our_step(model, processor, rows)
    assert batch.pixel_values is not None and len(batch.cu_seqlens) == len(rows) + 1
    hf.train()
    hf.zero_grad()
    for p in hf.parameters():
        p.requires_grad_(True)
    want = hf_step(hf, processor, rows, model.config)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    theirs = dict(hf.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        g = theirs[hf_name(name)].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g.reshape(p.grad.shape), rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(theirs)  # every tensor, the vision tower's too


def test_lora_step_matches_peft(setup):
    from peft import LoraConfig, get_peft_model

    folder, hf, processor, rows = setup
    torch.manual_seed(0)
    lora = dict(targets=TARGETS, rank=4, alpha=8.0, dropout=0.0)
    model = load_for_training(folder, dtype=torch.float32, device="cpu", full=False, train_vision=False, lora=lora)
    modules = lora_modules(model)
    with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: make both matter
        for m in modules.values():
            m.lora_B.normal_(0, 0.05)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    theirs = dict(peft.named_parameters())
    with torch.no_grad():
        for name, m in modules.items():
            for which in "AB":
                key = peft_key(name, which).replace(f".lora_{which}.", f".lora_{which}.default.")
                theirs[key].copy_(getattr(m, f"lora_{which}"))
    loss, _ = our_step(model, processor, rows)
    peft.train()
    want = hf_step(peft, processor, rows, model.config)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert len(modules) == 2 * len(TARGETS)
    for name, m in modules.items():
        for which in "AB":
            key = peft_key(name, which).replace(f".lora_{which}.", f".lora_{which}.default.")
            ours = getattr(m, f"lora_{which}").grad
            assert ours is not None and ours.abs().sum() > 0, name
            torch.testing.assert_close(ours, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    frozen = [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n]
    assert not frozen
