"""The packed-weight cache (backends/cpu/packed_cache.py): a second load maps what the first packed,
the same bits; a changed checkpoint, a broken file, the switch and the size floor."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch

from qwen2vl.backends import prepare
from qwen2vl.backends.cpu import isa, packed_cache, packing
from qwen2vl.backends.cpu.linear import FastLinear, kernel_takes
from qwen2vl.model import Qwen2VL
from tests.helpers.checkpoints import build_reference, save_checkpoint
from tests.helpers.tiers import TIERS_HERE, at_tier

IDS = torch.tensor([1, 5, 9, 200, 3, 17, 42, 7])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache in a folder of the test's own, with no size floor (the tiny model is a few KB) and no
    free-space share (a CI disk may be fuller than a tenth; the files are tiny)."""
    folder = tmp_path / "packed"
    monkeypatch.setenv(packed_cache.ENV, str(folder))
    monkeypatch.setattr(packed_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(packed_cache, "SPARE", 0)
    monkeypatch.setattr(packed_cache, "SPARE_SHARE", 0.0)
    return folder


def checkpoint(folder, seed=0):
    return save_checkpoint(build_reference(seed=seed), folder, dtype=torch.bfloat16)


def load(folder):
    """A prepared model; its cache write (on a thread of its own) ended, so the folder shows it."""
    model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16)
    prepare(model, checkpoint=folder)
    packed_cache.wait_for_writes()
    return model


def kernel_packed(model) -> dict[str, torch.Tensor]:
    return {name: m.packed for name, m in model.named_modules()
            if isinstance(m, FastLinear) and m.path.endswith("kernel")}


def logits(model):
    with torch.no_grad():
        return model.logits(IDS)


def kernel_here() -> bool:
    """Whether FastLinear packs bf16 weights at this tier (else it takes oneDNN and packs nothing)."""
    return kernel_takes(torch.empty(16, 64, dtype=torch.bfloat16), isa.current().matmul_dtype(torch.bfloat16))


@pytest.mark.parametrize("tier", TIERS_HERE)
def test_a_second_load_maps_the_first_loads_packing_bit_for_bit(tier, cache, tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "ckpt")
    with at_tier(tier):
        first = load(folder)
        files = list(cache.glob("*.bin")) if cache.is_dir() else []
        if not kernel_here():
            assert files == [] and kernel_packed(first) == {}
            return
        assert len(files) == 1
        packed = kernel_packed(first)
        assert any(name.startswith("visual.") for name in packed) and "lm_head" in packed

        def no_packing(*args):
            raise AssertionError("packed again although the cache file has it")

        with monkeypatch.context() as m:
            m.setattr(packing, "pack_bf16", no_packing)
            second = load(folder)
        again = kernel_packed(second)
        assert again.keys() == packed.keys()
        for name, t in packed.items():
            assert torch.equal(again[name].view(torch.int16), t.view(torch.int16)), name
        monkeypatch.setenv(packed_cache.ENV, "0")
        plain = load(folder)
        assert torch.equal(logits(second), logits(first)) and torch.equal(logits(plain), logits(first))


def test_a_changed_checkpoint_gets_a_new_file_in_place_of_the_old(cache, tmp_path):
    if not kernel_here():
        pytest.skip("no bf16 kernel at this tier: nothing is packed")
    folder = checkpoint(tmp_path / "ckpt")
    load(folder)
    (old,) = cache.glob("*.bin")
    checkpoint(folder, seed=1)  # other weights, same shapes: the key sees the new mtimes
    os.utime(next(folder.glob("*.safetensors")), ns=(1, 1))  # and whatever the clock's resolution
    model = load(folder)
    (new,) = cache.glob("*.bin")
    assert new != old
    plain = load_without_cache(folder)
    assert torch.equal(logits(model), logits(plain))


def load_without_cache(folder):
    old = os.environ.get(packed_cache.ENV)
    os.environ[packed_cache.ENV] = "0"
    try:
        return load(folder)
    finally:
        os.environ[packed_cache.ENV] = old


def test_a_truncated_file_is_packed_again_and_rewritten(cache, tmp_path, caplog):
    if not kernel_here():
        pytest.skip("no bf16 kernel at this tier: nothing is packed")
    folder = checkpoint(tmp_path / "ckpt")
    reference = logits(load(folder))
    (file,) = cache.glob("*.bin")
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size - 4096)
    with caplog.at_level(logging.WARNING, "qwen2vl.backends.cpu.packed_cache"):
        model = load(folder)
    assert "truncated" in caplog.text
    assert torch.equal(logits(model), reference) and file.stat().st_size == size


def test_off_or_small_models_keep_no_file(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "ckpt")
    where = tmp_path / "packed"
    monkeypatch.setenv(packed_cache.ENV, "0")
    load(folder)
    monkeypatch.setenv(packed_cache.ENV, str(where))
    load(folder)  # the default floor: packing a tiny model is quicker than a file
    assert not where.exists() or list(where.iterdir()) == []


def test_a_disk_short_of_its_share_gets_no_file_and_the_load_goes_on(cache, tmp_path, monkeypatch, caplog):
    if not kernel_here():
        pytest.skip("no bf16 kernel at this tier: nothing is packed")
    folder = checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(packed_cache, "SPARE_SHARE", 1.0)  # no disk has all of itself free
    with caplog.at_level(logging.INFO, "qwen2vl.backends.cpu.packed_cache"):
        model = load(folder)
    assert "not written" in caplog.text and list(cache.glob("*.bin")) == []
    assert torch.equal(logits(model), logits(load_without_cache(folder)))


def test_the_load_returns_before_its_write_ends_and_a_later_load_waits_for_it(cache, tmp_path, monkeypatch):
    if not kernel_here():
        pytest.skip("no bf16 kernel at this tier: nothing is packed")
    folder = checkpoint(tmp_path / "ckpt")
    release, write = threading.Event(), packed_cache._write

    def held_write(*args):
        assert release.wait(30), "the test never released the write"
        write(*args)

    monkeypatch.setattr(packed_cache, "_write", held_write)
    model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16)
    prepare(model, checkpoint=folder)  # returns with the write held
    assert list(cache.glob("*.bin")) == []
    release.set()

    def no_packing(*args):
        raise AssertionError("packed again: the second load did not wait for the first's file")

    monkeypatch.setattr(packing, "pack_bf16", no_packing)
    second = load(folder)  # opening the cache waits for the first load's write, then maps it
    assert len(list(cache.glob("*.bin"))) == 1
    assert torch.equal(logits(second), logits(model))
