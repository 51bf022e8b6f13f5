"""What this CPU can run, and the one switch that caps it.

Every fast path on the CPU is chosen from the features read here, never from the machine the code
was written on. Features are x86-64 names as /proc/cpuinfo spells them, grouped in tiers:

    none    no kernels of ours: torch's code everywhere (any CPU, ARM included)
    avx2    AVX2 + FMA + F16C (Zen 2/3, Intel client CPUs since Haswell, most cloud VMs)
    avx512  AVX-512 F/BW/VL/DQ, with BF16 and VNNI where the CPU has them (Zen 4/5, Xeon)
    amx     AMX tiles for bf16 and int8 (Xeon 4th gen and later)

`QWEN2VL_CPU_ISA=none|avx2|avx512|amx` caps the tier: features of higher tiers are dropped, so a
bigger CPU runs (and tests) exactly what a smaller one would. With torch's
`ATEN_CPU_CAPABILITY=avx2` and oneDNN's `ONEDNN_MAX_CPU_ISA=AVX2` next to it, a Zen 5 behaves as a
Zen 3 for every kernel in the process. A feature the CPU lacks can't be added by the switch.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

TIERS = ("none", "avx2", "avx512", "amx")
MATMULS = ("int8",)  # what LLM(matmul=...) takes besides None (the dtype's policy): see Isa.matmul_dtype
ENV = "QWEN2VL_CPU_ISA"

# what each tier adds: _BASE is what a CPU needs to be of that tier, _EXTRAS what some CPUs of the
# tier have (avx512_bf16: Zen 4+, Cooper Lake+; avx512_vnni: Ice Lake+, Zen 4+). AVX-VNNI (256-bit,
# Alder Lake, Zen 5) is left out on purpose: no kernel uses it, and under an avx2 cap a Zen 5 must
# look like a Zen 3.
_BASE = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "amx": {"amx_tile", "amx_bf16", "amx_int8"},
}
_EXTRAS = {
    "avx2": {"bmi2"},
    "avx512": {"avx512_bf16", "avx512_vnni", "avx512_fp16", "avx512cd", "avx512vbmi"},
    "amx": {"amx_fp16"},
}


@dataclass(frozen=True)
class Isa:
    """This CPU's usable features after the cap, and its tier."""

    tier: str
    features: frozenset[str]
    detected_tier: str  # before the cap
    cap: str | None  # the value of QWEN2VL_CPU_ISA, if set
    vendor: str = ""  # /proc/cpuinfo's vendor_id: "GenuineIntel", "AuthenticAMD", or "" where unknown

    def has(self, *features: str) -> bool:
        return all(f in self.features for f in features)

    @property
    def native_bf16_matmul(self) -> bool:
        """Whether bf16 GEMMs run in hardware here (AVX-512 BF16 or AMX): elsewhere torch emulates
        them, ~6-10x slower than float32, so matmul-heavy phases must not compute in bf16."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def stream_locality(self) -> int:
        """The prefetch locality (gcc's 0-3) our kernels give weights a pass reads once, compiled in
        (native.flags_for): prefetchnta (0) where that streams fastest, AMD's (a Zen 5 streams the 2B's
        decode at the read probe's rate with it), prefetcht1 (2) on Intel, where prefetchnta held a
        2-vCPU Xeon with AMX at 10 GB/s of its 25 and prefetcht1 at 22 (docs/performance.md)."""
        return 2 if self.vendor == "GenuineIntel" else 0

    def matmul_dtype(self, dtype: torch.dtype, matmul: str | None = None) -> torch.dtype:
        """The dtype matmuls on `dtype` weights should run in here (the compute-dtype policy):
        float32 for bf16 without native bf16 dot products and for fp16 without AVX-512 FP16, where
        torch would emulate them; the weights keep their dtype.

        `matmul="int8"` (LLM's knob, MATMULS) asks for int8 in the matmul-heavy phases (the vision
        tower, prefill: calls of many rows) of bf16 and float32 models: torch.int8 where the CPU runs
        the int8 kernel (int8_mm.c, AVX2 and up), weights quantized per output channel at load and
        activations per token on each call (docs/performance.md has its error and speed). Decode
        rows keep the dtype's policy."""
        if matmul not in (None, *MATMULS):
            raise ValueError(f"matmul must be None or one of {', '.join(MATMULS)}, got {matmul!r}")
        if matmul == "int8" and self.has(*_BASE["avx2"]) and dtype in (torch.bfloat16, torch.float32):
            return torch.int8
        if dtype == torch.bfloat16 and not self.native_bf16_matmul:
            return torch.float32
        if dtype == torch.float16 and not self.has("avx512_fp16"):
            return torch.float32
        return dtype


def _cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo, or "" without one."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        line = ""
    return line.split(":", 1)[1].strip() if line else ""


def _cpuinfo_flags() -> set[str]:
    line = _cpuinfo_field("flags")
    if line:
        return set(line.split())
    # no /proc (macOS, Windows): torch's own probe gives the tier's base, no extras
    cap = torch.backends.cpu.get_cpu_capability().lower()  # "default", "avx2", "avx512", "amx"?
    tiers = TIERS[1: TIERS.index(cap) + 1] if cap in TIERS else ()
    return set().union(*(_BASE[t] for t in tiers))


def tier_of(flags: set[str]) -> str:
    """The highest tier whose base features (and every lower tier's) are all in `flags`."""
    tier = "none"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return tier
    for t in TIERS[1:]:
        if not _BASE[t] <= flags:
            break
        tier = t
    return tier


def capped(flags: set[str], cap: str | None, vendor: str = "") -> Isa:
    """The Isa of a CPU with `flags` (and `vendor`) under the cap `cap` (a tier name, or None for no cap)."""
    if cap is not None and cap not in TIERS:
        raise ValueError(f"{ENV} must be one of {', '.join(TIERS)}, got {cap!r}")
    detected = tier_of(flags)
    tier = detected if cap is None else TIERS[min(TIERS.index(detected), TIERS.index(cap))]
    allowed = set().union(*(_BASE[t] | _EXTRAS[t] for t in TIERS[1: TIERS.index(tier) + 1]))
    return Isa(tier, frozenset(flags & allowed), detected, cap, vendor)


@functools.cache
def current() -> Isa:
    """This process's Isa: the CPU's features under $QWEN2VL_CPU_ISA (read once; `current.cache_clear()`
    after changing it, as the tests do)."""
    return capped(_cpuinfo_flags(), os.environ.get(ENV) or None, _cpuinfo_field("vendor_id"))
