"""All checkpoint surgery in one place: files, name layouts, Conv3d-as-Linear, tied head, dtypes.

The model is built on the meta device and each tensor is read from its safetensors file straight
into memory the model then owns (plain reads at the header's offsets, no memory map of the file:
mapped pages count as resident while they are copied, measured +1.4 GB of peak for the 2B, and the
OS may evict them and re-read the file mid-generation), converted once to the target dtype/device
and put in place, so peak memory is about one copy of the weights in the target dtype. Anything
missing, unexpected or mis-shaped is an error naming it.

The exception is a weight the caller will copy anyway (`mapped`: the CPU backend repacks every
linear into its kernels' layout): that one is a copy-on-write map of its own bytes only, so the
repacking reads the file's page cache directly instead of a fresh copy of it. Fresh memory is what
load costs where pages are first touched slowly (a VM whose host backs guest memory on first
touch: 0.3-2.7 GB/s measured here, against ~18 GB/s rewriting touched memory), and the map of one
tensor goes when its repacked copy replaces it, so peak memory does not grow.

A tensor-parallel rank (`plan`) reads only its slice of each tensor it holds: rows as one read,
columns a chunk of whole rows at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import re
from pathlib import Path

import torch
import torch.nn as nn

from qwen2vl.gptq import PACKED_FIELDS, QuantConfig, QuantizedLinear, unpack

# transformers 5 keeps these in-memory names on disk too; map them to the hub layout we use
_NAME_RULES = [
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^model\.visual\."), "visual."),
]


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: the index names shards that are missing: {missing}")
    return files


# safetensors dtype names -> torch
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_header(file: Path) -> dict:
    """The tensor table at the start of a safetensors file: 8 bytes of length, then JSON."""
    with open(file, "rb") as f:
        return _read_header(f, file)[0]


def _read_header(f, file: Path) -> tuple[dict, int]:
    """(tensor table, offset where the tensor data starts) from `f` at the start of `file`."""
    size = int.from_bytes(f.read(8), "little")
    if not 2 <= size <= 100 * 2**20 or size + 8 > file.stat().st_size:
        raise ValueError(f"{file}: not a safetensors file (bad header length {size})")
    try:
        header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{file}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensors(file: Path):
    """Yield (name, read) for every tensor of a safetensors file; read() returns it in its own memory,
    read((dim, start, stop)) only that slice of it (a 1-D or 2-D tensor), reading no other bytes,
    read(mapped=True) as a copy-on-write map of the file where its bytes are aligned for its dtype.

    Reading is deferred so a caller can skip tensors it doesn't want without reading their bytes.
    """
    file_size = file.stat().st_size
    with open(file, "rb", buffering=0) as f:
        header, data_start = _read_header(f, file)

        def read_into(view: memoryview, offset: int, name: str) -> None:
            f.seek(offset)
            while view.nbytes:  # readinto may return short reads on big requests
                got = f.readinto(view)
                if not got:
                    raise ValueError(f"{file}: truncated inside tensor {name}")
                view = view[got:]

        def read(name: str, info: dict, part: tuple[int, int, int] | None = None, mapped: bool = False
                 ) -> torch.Tensor:
            """The tensor, or only `part` = (dim, start, stop) of it (a tensor-parallel shard, always read)."""
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info.get("data_offsets", (0, -1))
            shape = list(info["shape"])
            size = torch.empty(0, dtype=dtype).element_size()
            nbytes = size * math.prod(shape)
            if end - begin != nbytes or data_start + end > file_size:
                raise ValueError(f"{file}: tensor {name} has offsets {begin}..{end} that don't fit "
                                 f"its shape {info['shape']} or the file ({file_size} bytes)")
            if part is None:
                if mapped and nbytes and (data_start + begin) % size == 0:
                    return _map(f, data_start + begin, shape, dtype, nbytes)
                tensor = torch.empty(shape, dtype=dtype)
                read_into(_bytes(tensor), data_start + begin, name)
                return tensor
            dim, start, stop = part
            if dim >= len(shape) or not 0 <= start < stop <= shape[dim] or len(shape) > 2:
                raise ValueError(f"{file}: tensor {name} of shape {shape} has no slice {start}:{stop} on dim {dim}")
            row = nbytes // shape[0]
            if dim == 0:  # whole rows: one contiguous range of the file
                tensor = torch.empty([stop - start, *shape[1:]], dtype=dtype)
                read_into(_bytes(tensor), data_start + begin + start * row, name)
                return tensor
            # columns of a matrix: whole rows a chunk at a time (16 MiB), keeping the columns
            tensor = torch.empty(shape[0], stop - start, dtype=dtype)
            step = max(1, 2**24 // row)
            for r in range(0, shape[0], step):
                chunk = torch.empty(min(step, shape[0] - r), shape[1], dtype=dtype)
                read_into(_bytes(chunk), data_start + begin + r * row, name)
                tensor[r : r + chunk.shape[0]] = chunk[:, start:stop]
            return tensor

        for name, info in header.items():
            yield name, lambda part=None, mapped=False, name=name, info=info: read(name, info, part, mapped)


def _map(f, start: int, shape: list[int], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    """A tensor of `shape` and `dtype` over a private (copy-on-write) map of f's `nbytes` from `start`."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    buf = mmap.mmap(f.fileno(), start - base + nbytes, offset=base, access=mmap.ACCESS_COPY)
    # the tensor holds `buf`: the map lives exactly as long as the tensor and its views
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start - base).view(shape)


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's own memory as writable bytes."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def canonical_name(name: str) -> str:
    for pattern, repl in _NAME_RULES:
        name = pattern.sub(repl, name)
    return name


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def load_weights(model: nn.Module, folder: Path, dtype: torch.dtype, device, tied_head: bool,
                 mapped=lambda name: False, plan=None) -> None:
    """Fill a meta-device `model` from the checkpoint in `folder`, in place. Tensors whose name
    `mapped(name)` accepts are mapped rather than read (see the module's docstring): only for those
    the caller replaces by a copy (a conversion to another dtype or device copies them too).
    `plan` (parallel/plan.py's ShardPlan): a tensor-parallel rank's, which reads only the tensors and
    slices it holds; the parameters it doesn't keep stay on the meta device.

    In a GPTQ or AWQ checkpoint (gptq.py) a linear stored as qweight/qzeros/scales[/g_idx] instead
    of `weight` becomes a gptq.QuantizedLinear holding integer codes; the tensors decide which
    linears are quantized, so AWQ's `modules_to_not_convert` and the fp16 vision tower load as usual.
    """
    quant = QuantConfig.from_folder(folder)
    if quant is not None and plan is not None:
        raise ValueError(f"{folder}: a {quant.method.upper()} checkpoint can't be split for tensor parallelism yet "
                         "(its packed tensors aren't sliced); use tensor_parallel_size=1")
    expected = dict(model.named_parameters(remove_duplicate=False))
    if tied_head:
        expected.pop("lm_head.weight", None)
    if plan is not None:
        expected = {name: p for name, p in expected.items() if plan.keeps(name)}
    seen: set[str] = set()
    unexpected: list[str] = []
    packed: dict[str, dict[str, torch.Tensor]] = {}  # quantized linear -> its packed tensors
    for file in checkpoint_files(folder):
        for disk_name, read in read_tensors(file):
            name = canonical_name(disk_name)
            module_name, _, field = name.rpartition(".")
            if quant is not None and field in PACKED_FIELDS and f"{module_name}.weight" in expected:
                packed.setdefault(module_name, {})[field] = read()
                continue
            if tied_head and name == "lm_head.weight":
                continue  # some tied checkpoints still carry a copy; the embedding is the truth
            if plan is not None and not plan.keeps(name):
                continue
            if name not in expected:
                unexpected.append(disk_name)
                continue
            if name in seen:
                raise ValueError(f"{folder}: tensor {name} appears twice (as {disk_name})")
            part = None if plan is None else plan.slice(name)
            tensor = read(part, mapped=part is None and mapped(name))
            want = expected[name].shape
            if name == "visual.patch_embed.proj.weight" and tensor.dim() == 5:
                tensor = tensor.reshape(tensor.shape[0], -1)  # Conv3d (E, C, T, P, P) -> Linear (E, C*T*P*P)
            if tensor.shape != want:
                raise ValueError(
                    f"{folder}: tensor {disk_name} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
                )
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
            seen.add(name)
    for module_name in list(packed):
        tensors = packed.pop(module_name)  # the packed words go as their codes come
        if f"{module_name}.weight" in seen:
            raise ValueError(f"{folder}: {module_name} has both a weight and quantized tensors ({', '.join(tensors)})")
        linear = model.get_submodule(module_name)
        weight = unpack(quant, f"{folder}: {module_name}", tensors, linear.in_features, linear.out_features)
        bias = linear.bias.detach() if f"{module_name}.bias" in seen else None
        model.set_submodule(module_name, QuantizedLinear(weight, bias))
        expected.pop(f"{module_name}.weight")
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors in checkpoint: {unexpected[:10]} ({len(unexpected)} in all)")
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{folder}: tensors missing from checkpoint: {missing[:10]} ({len(missing)} in all)")
    if tied_head and "model.embed_tokens.weight" in seen:
        model.lm_head.weight = model.model.embed_tokens.weight


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype the checkpoint declares (bf16 for the published ones)."""
    cfg = json.loads((folder / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.bfloat16
