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


def test_mapped_linears_equal_read_ones_and_write_only_to_themselves(hf, tmp_path):
    """map_linears: the linears' weights are copy-on-write maps of the file: the same values as a
    read, writable, and a write reaches neither the file nor a later load."""
    folder = save_checkpoint(hf, tmp_path / "m", dtype=torch.bfloat16)
    read = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16)
    mapped = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16, map_linears=True)
    ours = dict(mapped.named_parameters())
    for name, p in read.named_parameters():
        assert torch.equal(p, ours[name]), name
    before = (folder / "model.safetensors").read_bytes()
    weight = mapped.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.fill_(3.0)
    assert (folder / "model.safetensors").read_bytes() == before
    again = Qwen2VL.from_pretrained(folder, dtype=torch.bfloat16, map_linears=True)
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, read.model.layers[0].mlp.down_proj.weight)


def test_a_misaligned_tensor_is_read_not_mapped(tmp_path):
    """A tensor whose bytes sit at an offset its dtype can't be addressed at (safetensors files
    written without alignment) is read into memory of its own, with the same values."""
    from qwen2vl.loader import read_tensors

    data = torch.arange(6, dtype=torch.float32)
    header = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "b": {"dtype": "F32", "shape": [6], "data_offsets": [1, 25]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x07" + data.numpy().tobytes())
    tensors = {name: read(mapped=True) for name, read in read_tensors(path)}
    assert tensors["a"].tolist() == [7] and torch.equal(tensors["b"], data)
    assert tensors["b"].data_ptr() % 4 == 0  # a map would have put it at an odd address
