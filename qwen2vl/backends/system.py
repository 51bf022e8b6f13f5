"""`qwen2vl info --system`: what this machine gives the model, and why.

The CPU's tier and the cap on it, which C kernels load here (and why not the others), what a bf16
model computes in, the compiler, torch's own view of the CPU, a memory-read probe and the decode
speed it bounds. Everything is read live; nothing here changes what the model does.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

from qwen2vl.backends.cpu import isa, native

# bytes a decode step reads for Qwen2-VL-2B's decoder + head (1.54 B weights; REFERENCE.md §6.3)
DECODE_BYTES_2B = {"bf16": 3.09e9, "int8": 1.65e9, "int4": 0.93e9}


def read_gbs(mib: int = 512, reps: int = 3) -> float:
    """GB/s of a float32 `sum` over `mib` MiB, the best of `reps` (after a warm-up): the rate a
    decode GEMV can stream weights at, with torch's current thread count."""
    t = torch.ones(mib << 18)
    t.sum()
    best = min(_seconds(t.sum) for _ in range(reps))
    return t.numel() * 4 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def compiler() -> str:
    try:
        out = subprocess.run([native.CC, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else f"{native.CC}: failed"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{native.CC}: not found ({e.__class__.__name__}); no C kernels, torch's code everywhere"


def kernel_lines() -> list[str]:
    """One line per C library: the variant loaded, or why none did."""
    lines = []
    for name, variants in native.VARIANTS.items():
        chosen = native.variant(name)
        if chosen is None:
            least = [feats for _, feats in variants if feats][-1:]  # the variant that asks the least
            wants = "+".join(least[0]) if least else "a tier above none"
            lines.append(f"  {name:<13} off: needs {wants}")
        elif (lib := native.library(name)) is None:
            lines.append(f"  {name:<13} off: {chosen[0]} did not build or load (see the log)")
        else:
            source, features = lib.variant
            lines.append(f"  {name:<13} on: {source} for {'+'.join(features) or 'any tier'}{_amx_tiles(name)}")
    return lines


def _amx_tiles(name: str) -> str:
    """Whether a library's AMX tiles are on (their check runs at its first use), for the AMX builds."""
    from qwen2vl.backends.cpu import gemm, int8_mm

    lib = {"bf16_gemm": gemm.bf16_library, "int8_mm": int8_mm.library}.get(name, lambda: None)()
    if lib is None or not any(f.startswith("amx") for f in lib.variant[1]):
        return ""
    if lib.amx:
        return "; AMX tiles on" + (" (int8 / int4 models' prefill too)" if name == "bf16_gemm" else "")
    return f"; AMX tiles off ({gemm.AMX_ENV}=0, or Linux refused them or their check failed: see the log)"


def report(probe: bool = True) -> str:
    here = isa.current()
    cap = f", capped by {isa.ENV}={here.cap}" if here.cap else ""
    int8_tile = "AMX" if here.has("amx_int8") else "VNNI" if here.has("avx512_vnni") else "AVX2"
    lines = [
        f"cpu         {cpu_model()} ({os.cpu_count()} logical CPUs; torch uses {torch.get_num_threads()} threads)",
        f"tier        {here.tier} (the CPU's: {here.detected_tier}{cap})",
        f"features    {' '.join(sorted(here.features)) or 'none of ours'}",
        f"torch       {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
        f"{'yes' if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}",
        f"compiler    {compiler()}",
        "bf16 model  " + ("matmuls in bf16 (native bf16 dot products)" if here.native_bf16_matmul else
                          "bf16 weights and KV cache, matmuls in float32 (this CPU has no bf16 matmul: "
                          "torch would emulate it)"),
        "matmul int8 " + (f"available: LLM(matmul='int8') / --matmul int8 run the vision tower and prefill in "
                          f"int8 (int8_mm, {int8_tile}; weights per channel, activations per token); off by default"
                          if here.matmul_dtype(torch.bfloat16, "int8") == torch.int8 else
                          "unavailable (needs AVX2): matmul='int8' keeps the dtype's policy"),
        "C kernels",
        *kernel_lines(),
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda        {torch.cuda.get_device_name()} (torch CUDA {torch.version.cuda})")
    if probe:
        gbs = read_gbs()
        bounds = ", ".join(f"{k} {gbs * 1e9 / b:.1f}" for k, b in DECODE_BYTES_2B.items())
        lines.append(f"memory      {gbs:.1f} GB/s read (float32 sum of 512 MiB, best of 3)")
        lines.append(f"decode      at most {bounds} tok/s for Qwen2-VL-2B, one stream (weights read per token)")
    return "\n".join(lines)
