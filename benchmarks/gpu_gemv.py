"""Batch-1 decode linears on a GPU: cuBLAS (F.linear) vs the Triton GEMV (kernels/triton_gemv.py).

For each 2B decode shape (fused qkv, o, fused gate/up, down, head) prints the time of one
[1, K] x [N, K]^T product and the weight bytes per second it streams, for cuBLAS, for the GEMV's
default block config, and for a sweep of configs (the best named), next to a device copy probe
(bytes read + written per second). Each timing replays a CUDA graph of one product per weight copy,
over enough copies (>= 200 MB) that the 50 MB L2 holds none of them: no launch gaps, no cache hits.

    python -m benchmarks.gpu_gemv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from qwen2vl.kernels import triton_gemv

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "head": (151936, 1536)}
SWEEP = [(1, 2048, 4), (2, 2048, 4), (4, 2048, 4), (8, 2048, 8), (4, 4096, 8), (2, 1024, 2), (4, 1024, 4),
         (8, 1024, 4), (8, 512, 2), (16, 512, 4), (16, 256, 4), (32, 256, 8)]


def graphed_ms(fn, copies: int) -> float:
    """Median ms of one fn(i), from a CUDA graph calling fn(0) ... fn(copies - 1)."""
    for i in range(copies):  # warm: compiles, picks kernels
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return do_bench(graph.replay, warmup=25, rep=150, return_mode="median") / copies


def copy_probe(dev) -> float:
    """GB/s of a 512 MB device-to-device copy, bytes read + written."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src), warmup=25, rep=150, return_mode="median") / 1e6


def time_shape(name: str, n: int, k: int, g: torch.Generator) -> tuple[float, float, float]:
    """Prints cuBLAS, the default GEMV and the sweep on weights [n, k]; returns their ms (best of the sweep)."""
    copies = max(2, -(-200_000_000 // (2 * n * k)))
    ws = [torch.randn(n, k, generator=g, device=g.device).to(torch.bfloat16) for _ in range(copies)]
    bias = torch.randn(n, generator=g, device=g.device).to(torch.bfloat16) if name == "qkv" else None
    x = torch.randn(1, k, generator=g, device=g.device).to(torch.bfloat16)
    gb = 2 * n * k / 1e9
    want = F.linear(x.float(), ws[0].float(), None if bias is None else bias.float())
    err = ((triton_gemv.gemv(x, ws[0], bias).float() - want).abs().max() / want.abs().max()).item()
    cublas = graphed_ms(lambda i: F.linear(x, ws[i], bias), copies)
    default = graphed_ms(lambda i: triton_gemv.gemv(x, ws[i], bias), copies)
    sweep = {cfg: graphed_ms(lambda i, cfg=cfg: triton_gemv.gemv(x, ws[i], bias, block=cfg), copies)
             for cfg in SWEEP}
    best = min(sweep, key=sweep.get)
    print(f"{name:8s} [{n}, {k}]: cuBLAS {cublas * 1e3:7.1f} us ({gb / cublas * 1e3:5.0f} GB/s); Triton GEMV "
          f"default {triton_gemv.config(n, k)} {default * 1e3:7.1f} us ({gb / default * 1e3:5.0f} GB/s, "
          f"{cublas / default:.2f}x cuBLAS); best {best} {sweep[best] * 1e3:7.1f} us "
          f"({gb / sweep[best] * 1e3:5.0f} GB/s); max error / max |out| {err:.1e}", flush=True)
    print("   sweep (us): " + ", ".join(f"{c}: {t * 1e3:.1f}" for c, t in sweep.items()), flush=True)
    return cublas, default, sweep[best]


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    print(f"copy probe: {copy_probe(dev):.0f} GB/s (bytes read + written)", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = [time_shape(name, n, k, g) for name, (n, k) in SHAPES.items()]
    total = [sum(r[i] for r in rows[:4]) for i in range(3)]
    print(f"a decoder layer's four linears: cuBLAS {total[0] * 1e3:.1f} us, GEMV default {total[1] * 1e3:.1f} us, "
          f"best configs {total[2] * 1e3:.1f} us; x28 layers: {28 * total[0]:.3f} / {28 * total[1]:.3f} / "
          f"{28 * total[2]:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
