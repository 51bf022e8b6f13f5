"""The C kernels: compiled on first use for this CPU's tier, loaded with ctypes, typed from one header.

Each library is built from one source in csrc/ for one *variant*: the CPU features it is compiled
for (e.g. AVX-512 BF16) become its `-m` flags, so a variant builds on any x86 machine and runs
wherever isa.current() has those features; `library(name)` loads the best variant the CPU (under
the QWEN2VL_CPU_ISA cap) can run, or None, logged once. The .so is cached per source, headers,
flags and compiler in $XDG_CACHE_HOME/qwen2vl/kernels (~/.cache by default); a build takes about
a second (no torch headers). Each links libgomp.so.1, the OpenMP runtime torch already loaded, so
both share one thread pool; ctypes releases the GIL during a call.

Function signatures and the decode step's structs come from csrc/kernels.h, which every source
includes: the compiler holds the C side to the header and this module reads the Python side from
it (`Header`), so the two can't drift.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path

from qwen2vl.backends.cpu import isa

CSRC = Path(__file__).with_name("csrc")
HEADER = CSRC / "kernels.h"
CC = os.environ.get("CC", "cc")
BASE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# a CPU feature (as /proc/cpuinfo names it) -> the gcc/clang flag that lets code use it
FEATURE_FLAGS = {
    "avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c", "bmi2": "-mbmi2",
    "avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl", "avx512dq": "-mavx512dq",
    "avx512_bf16": "-mavx512bf16", "avx512_vnni": "-mavx512vnni",
    "amx_tile": "-mamx-tile", "amx_bf16": "-mamx-bf16", "amx_int8": "-mamx-int8",
}
AVX2 = ("avx2", "fma", "f16c")
AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")

# library -> its variants, best first: (source in csrc/, features it is compiled for and needs)
VARIANTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # the AMX build adds tile products for prefill rows (bf16_amx.h) to the same source
    "bf16_gemm": [("bf16_gemm.c", (*AVX512, "avx512_bf16", "amx_tile", "amx_bf16")),
                  ("bf16_gemm.c", (*AVX512, "avx512_bf16"))],
    "bf16w_gemm": [("bf16w_gemm.c", (*AVX2, *AVX512)), ("bf16w_gemm.c", AVX2)],
    "int_gemv": [("int_gemv.c", (*AVX512, "avx512_vnni")), ("int_gemv_avx2.c", AVX2)],
    # the AMX build adds int8 tile products (int8_amx.h) to the same source
    "int8_mm": [("int8_mm.c", (*AVX2, *AVX512, "avx512_vnni", "amx_tile", "amx_int8")),
                ("int8_mm.c", (*AVX2, *AVX512, "avx512_vnni")), ("int8_mm.c", AVX2)],
    # the small ops: one source each, for AVX-512 (with FMA on 8 lanes, bf16_simd.h's f32x8) or AVX2
    "layer_ops": [("layer_ops.c", (*AVX2, *AVX512)), ("layer_ops.c", AVX2)],
    "paged_decode": [("paged_decode.c", (*AVX2, *AVX512)), ("paged_decode.c", AVX2)],
    "vision_ops": [("vision_ops.c", (*AVX2, *AVX512)), ("vision_ops.c", AVX2)],
    "decode_step": [("decode_step.c", ())],
    # plain C: the layout every kernel above reads, written at load (wherever one of them runs)
    "pack": [("pack.c", AVX2)],
    "top_k": [("top_k.c", (*AVX2, *AVX512)), ("top_k.c", AVX2)],
}
# flags a source needs beyond its features': the small ops round where torch rounds, so no a*b+c may
# become one FMA unless the source asks for it (gcc fuses them by default wherever FMA is on)
SOURCE_FLAGS = {src: ["-ffp-contract=off"] for src in ("layer_ops.c", "paged_decode.c", "vision_ops.c", "int8_mm.c")}

log = logging.getLogger(__name__)


def flags_for(features: tuple[str, ...]) -> list[str]:
    return [*BASE_FLAGS, f"-DSTREAM_LOCALITY={isa.current().stream_locality}", *(FEATURE_FLAGS[f] for f in features)]


def build(source: Path, flags: list[str]) -> Path:
    """The compiled .so of `source` with `flags`, compiled now unless it is in the cache."""
    text = source.read_bytes()
    # the local headers it includes are part of what gets compiled (one level: headers include kernels.h only)
    names = sorted({h.decode() for h in re.findall(rb'#include "([^"]+)"', text)} - {HEADER.name})
    headers = [HEADER.read_bytes(), *(source.with_name(n).read_bytes() for n in names)]
    key = hashlib.sha256(b"\0".join([text, *headers, " ".join([CC, *flags]).encode()]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen2vl" / "kernels"
    out = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=cache)
        os.close(fd)
        try:
            subprocess.run([CC, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, out)  # atomic: concurrent builds each write their own file, and either wins
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def variants(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """The variants of library `name` this CPU can run under the cap, best first."""
    here = isa.current()
    return [(src, feats) for src, feats in VARIANTS[name] if here.has(*feats) and (feats or here.tier != "none")]


def variant(name: str) -> tuple[str, tuple[str, ...]] | None:
    """The best variant of library `name` this CPU can run under the cap, or None."""
    return next(iter(variants(name)), None)


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """Library `name` (a key of VARIANTS) built and loaded with its functions typed from kernels.h,
    or None, logged once: no variant for this CPU (at info: the norm below AVX-512), no compiler, a
    failed compile. A variant that fails to build gives way to the next one this CPU runs (an AMX
    variant needs a gcc >= 11; the AVX-512 one does not). `lib.variant` is the one loaded.
    `library.cache_clear()` after changing the cap."""
    candidates = variants(name)
    if not candidates:
        log.info("%s: no variant for this CPU (tier %s), using torch's kernels", name, isa.current().tier)
        return None
    for i, (source, features) in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            lib = ctypes.CDLL(str(build(CSRC / source, flags_for(features) + SOURCE_FLAGS.get(source, []))))
        except subprocess.CalledProcessError as e:
            if not last:
                log.warning("%s: %s for %s did not build, trying the next variant:\n%s", name, source,
                            "+".join(features), e.stderr[-2000:])
                continue
            log.warning("%s: compile failed, using torch's kernels:\n%s", name, e.stderr[-2000:])
            return None
        except OSError as e:  # no compiler, no writable cache folder, a .so that won't load
            log.warning("%s unavailable (%s), using torch's kernels", name, e)
            return None
        header().type_functions(lib)
        lib.variant = (source, features)
        return lib
    return None


def address(fn) -> int:
    """The address of a ctypes function (for the decode step's tables)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


# --- kernels.h, read once --------------------------------------------------------------------------

_SCALARS = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float}
_RETURNS = {"void": None, "int": ctypes.c_int, "int64_t": ctypes.c_int64}


class Header:
    """The prototypes and structs of kernels.h as ctypes types."""

    def __init__(self, text: str):
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        self.structs: dict[str, type[ctypes.Structure]] = {}
        for body, name in re.findall(r"typedef struct \{(.*?)\}\s*(\w+);", text, flags=re.S):
            fields = [(field, ctype) for decl in body.split(";") if decl.strip() for field, ctype in self._fields(decl)]
            self.structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
        self.functions: dict[str, tuple] = {}
        for ret, fname, params in re.findall(r"^(void|int|int64_t)\s+(\w+)\(([^)]*)\);", text, flags=re.M):
            self.functions[fname] = (_RETURNS[ret], [self._param(p) for p in params.split(",")])

    def _ctype(self, base: str, pointer: bool):
        if pointer:
            return ctypes.c_void_p
        return _SCALARS.get(base) or self.structs[base]

    def _fields(self, decl: str):
        m = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s+(.*)", decl, flags=re.S)
        base, declarators = m.groups()
        for d in declarators.split(","):
            yield d.replace("*", "").strip(), self._ctype(base, "*" in d)

    def _param(self, param: str):
        m = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\*?)\s*\w+\s*", param)
        assert m, f"kernels.h: can't read parameter {param!r}"
        return self._ctype(m.group(1), bool(m.group(2)))

    def type_functions(self, lib: ctypes.CDLL) -> None:
        """Set restype and argtypes of every declared function `lib` exports."""
        for fname, (restype, argtypes) in self.functions.items():
            fn = getattr(lib, fname, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes


@functools.cache
def header() -> Header:
    return Header(HEADER.read_text())
