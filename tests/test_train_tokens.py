"""`qwen2vl train --full --train-tokens IDS`: only those rows of the embedding (and of an untied head)
change; every other weight of the checkpoint it writes is the base's, bit for bit. (Beside LoRA:
tests/test_lora_tokens.py.)"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from qwen2vl.processing.tokenizer import Tokenizer
from qwen2vl.train.cli import _numbers
from qwen2vl.train.loop import TrainConfig, train
from tests.helpers.training import model_folder, sample_rows, write_jsonl

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("train_tokens")
    model_folder(root / "base", tie=request.param)
    data = write_jsonl(root / "data.jsonl", sample_rows(root))
    tok = Tokenizer.from_pretrained(root / "base")
    answers = {i for text in ("A noisy square.", "The first is taller.", "Yes.") for i in tok.encode(text)}
    return root, data, sorted(answers)


def weights(folder) -> dict[str, torch.Tensor]:
    (file,) = folder.glob("*.safetensors")
    return load_file(str(file))


def test_only_the_named_rows_change(setup):
    root, data, answer_ids = setup
    chosen = answer_ids[:3] + [7, 151000]  # three tokens the answers hold, two they do not
    out = train(TrainConfig(model=str(root / "base"), data=str(data), output=str(root / "out"), full=True,
                            train_tokens=chosen, dtype="fp32", lr=1e-2, batch_size=2, steps=3, overwrite=True),
                log=lambda _: None)
    base, trained = weights(root / "base"), weights(out)
    assert base.keys() == trained.keys()
    for name in base:
        if name not in (EMBED, HEAD):
            assert torch.equal(base[name], trained[name]), name
    others = torch.ones(base[EMBED].shape[0], dtype=torch.bool)
    others[chosen] = False
    for name in {EMBED, HEAD} & base.keys():
        assert torch.equal(base[name][others], trained[name][others]), name
    moved = (base[EMBED][chosen] != trained[EMBED][chosen]).any(dim=1).tolist()
    assert moved[:3] == [True] * 3  # what the answers read and (tied) predict
    if HEAD in base:  # untied: every chosen output row gets the softmax's gradient, in the answers or not
        assert (base[HEAD][chosen] != trained[HEAD][chosen]).any(dim=1).all()
        assert moved[3:] == [False, False]  # the embedding rows of tokens no row holds have no gradient


def test_full_train_tokens_refuses_weight_decay_and_vision(setup):
    root, data, answer_ids = setup
    base = dict(model=str(root / "base"), data=str(data), output=str(root / "bad"), dtype="fp32", steps=1,
                train_tokens=answer_ids[:2], overwrite=True)
    for extra in ({"full": True, "weight_decay": 0.01}, {"full": True, "train_vision": True}):
        with pytest.raises(ValueError, match="--full --train-tokens .* no --train-vision, --init-random or "):
            train(TrainConfig(**base, **extra), log=lambda _: None)
    with pytest.raises(ValueError, match=r"--train-tokens: ids \[151936\] are outside the vocabulary"):
        train(TrainConfig(**{**base, "train_tokens": [3, 151936]}, full=True), log=lambda _: None)


def test_numbers_take_lists_and_ranges():
    assert _numbers("3, 7,10-12") == [3, 7, 10, 11, 12]
    for bad in ("", "a", "3-b", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _numbers(bad)
