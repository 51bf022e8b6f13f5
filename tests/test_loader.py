"""The loader: both config layouts read the same, and a bad checkpoint fails loudly by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import Qwen2VL
from qwen2vl.config import Qwen2VLConfig
from tests.helpers.checkpoints import build_reference, save_checkpoint


@pytest.fixture(scope="module")
def hf():
    return build_reference(tie=False)


def test_flat_and_nested_configs_agree(hf, tmp_path):
    nested = Qwen2VLConfig.from_pretrained(save_checkpoint(hf, tmp_path / "a", layout="hub"))
    flat = Qwen2VLConfig.from_pretrained(save_checkpoint(hf, tmp_path / "b", layout="flat"))
    assert nested == flat
    assert nested.text.mrope_section == (2, 3, 3) and nested.image_token_id == 250 and not nested.tie_word_embeddings


def test_loads_straight_to_dtype_and_keeps_no_meta(hf, tmp_path):
    model = Qwen2VL.from_pretrained(save_checkpoint(hf, tmp_path / "c", dtype=torch.bfloat16), dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)


def _mutate(folder, fn):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda s: s.pop("model.norm.weight"), "missing from checkpoint: \\['model.norm.weight'\\]"),
        (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), "unexpected tensors.*model.extra.weight"),
        (lambda s: s.__setitem__("model.norm.weight", torch.zeros(3)), "model.norm.weight has shape \\(3,\\)"),
        (lambda s: s.pop("lm_head.weight"), "missing from checkpoint: \\['lm_head.weight'\\]"),
    ],
)
def test_bad_checkpoints_name_the_tensor(hf, tmp_path, mutation, message):
    folder = save_checkpoint(hf, tmp_path / "bad")
    _mutate(folder, mutation)
    with pytest.raises(ValueError, match=message):
        Qwen2VL.from_pretrained(folder, dtype=torch.float32)


def test_missing_shard_and_folder(hf, tmp_path):
    folder = save_checkpoint(hf, tmp_path / "sharded", shards=2)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        Qwen2VL.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Qwen2VL.from_pretrained(str(tmp_path / "nowhere"))


def test_wrong_model_type(hf, tmp_path):
    folder = save_checkpoint(hf, tmp_path / "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        Qwen2VL.from_pretrained(folder)


def test_reads_tensors_into_memory_it_owns(hf, tmp_path):
    """Same dtype on disk and in memory: the weights must not be views of the file."""
    folder = save_checkpoint(hf, tmp_path / "own", dtype=torch.bfloat16)
    model = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16)
    on_disk = load_file(str(folder / "model.safetensors"))
    name, disk = next((n, t) for n, t in on_disk.items() if n.endswith("q_proj.weight"))
    mine = model.get_parameter(name.replace("model.language_model.", "model.").replace("model.visual.", "visual."))
    assert torch.equal(mine, disk)
    (folder / "model.safetensors").unlink()  # nothing of the file is still in use
    assert torch.equal(mine, disk)


def test_truncated_or_corrupt_file_is_a_clear_error(hf, tmp_path):
    folder = save_checkpoint(hf, tmp_path / "cut")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="don't fit|truncated"):
        Qwen2VL.from_pretrained(folder)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        Qwen2VL.from_pretrained(folder)
