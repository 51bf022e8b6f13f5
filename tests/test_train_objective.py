"""train(objective=...): a lesson's own loss is what the steps minimise (qwen2vl/demo/box_attention.py adds an
attention term that way); held-out loss and every other run keep loss_sum."""

from __future__ import annotations

import pytest

from qwen2vl.train.loop import TrainConfig, train
from qwen2vl.train.step import loss_sum
from tests.helpers.training import model_folder, sample_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_objective")
    model_folder(root / "base")
    return root, write_jsonl(root / "data.jsonl", sample_rows(root))


def config(root, data, output) -> TrainConfig:
    return TrainConfig(model=str(root / "base"), data=str(data), output=str(root / output), dtype="fp32", lr=0.0,
                       lora_rank=4, lora_alpha=8, lora_dropout=0.0, batch_size=2, steps=1, seed=3, save_every=None,
                       max_grad_norm=1e9)


def test_the_objective_is_what_the_steps_minimise(setup):
    """train(objective=...) steps on that loss: twice loss_sum logs twice the loss and gradient norm (the clip
    at 1.0 would hide the norm, so it is lifted; the rate is 0)."""
    root, data = setup
    logged, calls = [], []

    def doubled(model, batch):
        calls.append(batch.num_targets)
        return 2 * loss_sum(model, batch)

    for name, objective in (("plain", loss_sum), ("doubled", doubled)):
        lines = []
        train(config(root, data, f"objective-{name}"), log=lines.append, objective=objective)
        (step,) = [line for line in lines if line.startswith("step 1/1")]
        logged.append([float(step.split(f"{key} ")[1].split(" ")[0]) for key in ("loss", "grad")])
    assert calls and logged[1] == pytest.approx([2 * logged[0][0], 2 * logged[0][1]], rel=1e-3)
