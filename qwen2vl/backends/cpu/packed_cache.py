"""Packed weights kept on disk, so that later loads of a checkpoint map them instead of packing again.

Packing the 2B's linears for our bf16 kernels writes 4.4 GB of fresh memory, and on a VM whose host
backs guest memory on first touch that is most of the load (0.3-3 GB/s measured here, where
transformers maps the safetensors file and touches nothing). The first load of a checkpoint packs
as before and then writes what it packed to one file; later loads map that file privately (never
written: its pages stay the page cache's, shared by every process that maps it) and hand out views
of it. Where the filesystem keeps large folios (ext4 and xfs on Linux >= 6.x), the kernel maps the
file 2 MiB at a time, as the huge pages packing.empty_huge asks for (measured on this VM: 3.75 of
4.3 GB FilePmdMapped), so decode's TLB reach is the same.

Where: $QWEN2VL_PACKED_CACHE (a folder), else $XDG_CACHE_HOME/qwen2vl/packed (~/.cache by
default); `QWEN2VL_PACKED_CACHE=0` turns it off. One file per checkpoint folder, about the size of
its packed linears (4.4 GB for the 2B in bf16), named by a hash of the folder's path and a key over
the format, the dtype and every shard's name, size, mtime and safetensors header: a changed
checkpoint gets a new file, which replaces the folder's old one. Models whose packed linears are
under MIN_BYTES keep no file (packing them takes well under a second). A file that can't be
written (no space: it must leave SPARE and a tenth of the disk free; read-only) is logged and the load
goes on. A write is logged as a warning, with its size, place and switch: nobody should find
gigabytes in their cache they were not told about.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from qwen2vl.backends.cpu import packing
from qwen2vl.loader import checkpoint_files

ENV = "QWEN2VL_PACKED_CACHE"
FORMAT = 1  # bump when pack_bf16's layout changes
MIN_BYTES = 256 << 20
ALIGN = 4096  # each tensor's offset in the file: whole pages
SPARE = 1 << 30  # free space a write must leave
SPARE_SHARE = 0.1  # and this share of the disk: a cache must not be what fills it

log = logging.getLogger(__name__)
_writes: list[threading.Thread] = []  # writes in flight, so that a later load of this process waits for them


def wait_for_writes() -> None:
    """Return once every cache write this process started has ended (a load calls it before reading)."""
    while _writes:
        _writes.pop().join()


def cache_dir() -> Path | None:
    where = os.environ.get(ENV)
    if where == "0":
        return None
    if where:
        return Path(where)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2vl" / "packed"


def checkpoint_key(folder: Path, dtype: torch.dtype) -> str:
    """A hash of what the packed weights depend on: the format, the dtype, every shard's name,
    size, mtime and header (shapes and offsets of every tensor)."""
    h = hashlib.sha256(json.dumps([FORMAT, str(dtype), packing.ROWS]).encode())
    for file in checkpoint_files(folder):
        stat = file.stat()
        with open(file, "rb") as f:
            header = f.read(8 + min(int.from_bytes(f.read(8), "little"), 100 << 20))
        h.update(json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode() + header)
    return h.hexdigest()


class PackedCache:
    """pack_bf16 by linear name: a view of the cache file where it holds the name at the right
    shape, else packed now (and, at `save`, written with the rest)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.entries: dict[str, tuple[int, list[int]]] = {}  # name -> (offset, packed shape)
        self.map: mmap.mmap | None = None
        self.packed: dict[str, torch.Tensor] = {}  # every tensor handed out this load, by name
        self.missed = 0
        self._read()

    @classmethod
    def open(cls, folder: Path, dtype: torch.dtype) -> PackedCache | None:
        """The cache for the checkpoint in `folder` loaded in `dtype`, or None where it is off."""
        where = cache_dir()
        if where is None or dtype != torch.bfloat16:
            return None
        wait_for_writes()  # a write of this checkpoint in flight: map it when it is whole, not pack again
        key = checkpoint_key(folder, dtype)
        return cls(where / f"{_folder_id(folder)}-{key[:16]}.bin", key)

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                index = json.loads(f.read(size)) if 2 <= size <= 16 << 20 else {}
                if index.get("key") != self.key:
                    return
                start = _data_start(size)  # the entries' offsets count from here
                end = start + max((off + _nbytes(shape) for off, shape in index["entries"].values()), default=0)
                if os.fstat(f.fileno()).st_size < end:
                    log.warning("%s: truncated (%d bytes, its index needs %d); packing again", self.path,
                                os.fstat(f.fileno()).st_size, end)
                    return
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: torch wants it writable
                self.entries = {name: (start + off, shape) for name, (off, shape) in index["entries"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable (%s); packing again", self.path, e)
            return
        try:  # where the file is not in the page cache yet, read it ahead in 2 MiB folios
            self.map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass

    def pack_bf16(self, name: str, weight: torch.Tensor, huge_pages: bool = True) -> torch.Tensor:
        """packing.pack_bf16(weight, huge_pages), from the file where it has `name` at this shape."""
        shape = packing.packed_bf16_shape(*weight.shape)
        entry = self.entries.get(name)
        if entry is not None and entry[1] == shape:
            packed = torch.frombuffer(self.map, dtype=torch.bfloat16, count=math.prod(shape), offset=entry[0])
            packed = packed.view(shape)
        else:
            packed = packing.pack_bf16(weight, huge_pages)
            self.missed += 1
        self.packed[name] = packed
        return packed

    def save(self) -> None:
        """Write every tensor handed out to the file, if any was packed now and they are worth it, on a
        thread of its own: the load returns at once (a write is disk-bound: 9 s for the 2B's 4.4 GB
        here), and the thread is not a daemon, so the process ends only when the file is whole."""
        total = sum(_nbytes(list(t.shape)) + ALIGN for t in self.packed.values())
        if not self.missed or total < MIN_BYTES:
            return
        thread = threading.Thread(target=self._save, args=(total,), name="qwen2vl-packed-cache")
        _writes.append(thread)
        thread.start()

    def _save(self, total: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(self.path.parent)
            spare = max(SPARE, int(disk.total * SPARE_SHARE))
            if disk.free < total + spare:
                log.info("%s: not written: %.1f GB free, it needs %.1f + %.1f GB", self.path, disk.free / 1e9,
                         total / 1e9, spare / 1e9)
                return
            start = time.perf_counter()
            _write(self.path, self.key, self.packed)
            log.warning("%s: wrote %.2f GB of packed weights in %.1f s, so that later loads map them "
                        "(%s=0 turns this off)", self.path, total / 1e9, time.perf_counter() - start, ENV)
            for old in self.path.parent.glob(self.path.name.split("-")[0] + "-*"):
                if old != self.path:  # the folder's stale packings (another key) and dead writers' files
                    old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("%s: not written (%s); later loads pack again", self.path, e)


def _write(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    entries, offset = {}, 0
    for name, t in tensors.items():
        offset = -(-offset // ALIGN) * ALIGN
        entries[name] = (offset, list(t.shape))
        offset += _nbytes(list(t.shape))
    index = json.dumps({"key": key, "entries": entries}).encode()
    start = _data_start(len(index))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(index).to_bytes(8, "little") + index)
            for name, t in tensors.items():
                f.seek(start + entries[name][0])
                f.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    finally:
        if tmp.exists():
            tmp.unlink()


def _data_start(index_size: int) -> int:
    """Where the tensors start: after the 8-byte length and the JSON index, on a page."""
    return -(-(8 + index_size) // ALIGN) * ALIGN


def _nbytes(shape: list[int]) -> int:
    return math.prod(shape) * 2  # bf16


def _folder_id(folder: Path) -> str:
    return hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]
