"""Per-call time of the small-op C kernels (layer_ops.c, paged_decode.c, vision_ops.c) against the torch
ops each replaces, at the Qwen2-VL-2B shapes: a batch-1 decode step's (hidden 1536, 12 q + 2 kv
heads of 128, intermediate 8960, attention over 300 and 2000 cached tokens), and the vision tower's
for one 448x448 image (1024 patches, 16 heads of 80, MLP 5120).

Runs at the tier the environment gives: for an AVX2 machine's figures on a bigger one,
    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.small_ops_cpu
`--baseline REV` also times the kernels as built from git revision REV's sources, with REV's own
native.py (its variants and flags), on the same inputs: a kernel change's before/after.
Methods are interleaved round by round in one process, medians of the rounds. With --threads 1 the
time is this thread's CPU time, not wall time: on a shared machine a neighbour's slice then doesn't
count (wall time is used with more threads, where it is what a call costs).

    python -m benchmarks.small_ops_cpu [--rounds 15] [--baseline d4bd998]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from qwen2vl.engine.paged_attention import PagedBatch, paged_attention

from qwen2vl.backends.cpu import isa, layer_ops, native, vision_ops
from qwen2vl.rotary import apply_rotary
from qwen2vl.text import RMSNorm

BF16 = torch.bfloat16
D, HQ, HKV, DH, INTER = 1536, 12, 2, 128, 8960  # the 2B's decoder
PATCHES, VHEADS, VDH, VMLP = 1024, 16, 80, 5120  # its vision tower, one 448x448 image
BLOCK = 16


def randn(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(BF16)


def cos_sin(n, dim, dtype):  # a rotation's: repeated calls in place keep the values' size
    angles = torch.rand(n, dim // 2).repeat(1, 2) * 6.28
    return angles.cos().to(dtype), angles.sin().to(dtype)


PRISTINE: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer a kernel changes in place, its first values)


def in_place(t: torch.Tensor) -> torch.Tensor:
    """t, restored to its values now before each timing (restore()): no drift to denormals over rounds."""
    PRISTINE.append((t, t.clone()))
    return t


def restore():
    for t, first in PRISTINE:
        t.copy_(first)


def baseline_native(rev: str):
    """native.py of git revision `rev`, with its own csrc/, loaded as a module (builds go to the same cache)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"qwen2vl-{rev}-"))
    archive = subprocess.run(["git", "archive", rev, "qwen2vl/backends/cpu"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location(f"native_{rev}", tmp / "qwen2vl/backends/cpu/native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases():
    """name -> (the kernel's library, torch's ops, our wrapper as the model calls it, raw(lib): the bare
    ctypes call on a build `lib` of that library), on shared inputs."""
    t = torch.get_num_threads()
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    out = {}

    x, res, norm = randn(1, D), randn(1, D, scale=4), RMSNorm(D, 1e-6).to(BF16)
    y, tot = torch.empty_like(x), torch.empty_like(x)
    out["add + RMSNorm [1, 1536]"] = (
        "layer_ops", lambda: norm(res + x), lambda: layer_ops.add_rms_norm(x, res, norm.weight, 1e-6),
        lambda lib: lambda: lib.rms_norm(ptr(x), ptr(res), ptr(tot), ptr(norm.weight), ptr(y), 1, D, 1e-6, t))

    qkv, (cos, sin) = in_place(randn(1, (HQ + 2 * HKV) * DH)), cos_sin(1, DH, BF16)
    qk = qkv[:, : (HQ + HKV) * DH]
    out["rotary q, k [1, 14 x 128]"] = (
        "layer_ops", lambda: apply_rotary(qk.view(1, HQ + HKV, DH), cos, sin),
        lambda: layer_ops.rotary_(qkv, cos, sin, HQ + HKV, DH),
        lambda lib: lambda: lib.rotary(ptr(qkv), qkv.stride(0), ptr(cos), ptr(sin), 1, HQ + HKV, DH, t))

    gate, up, act = randn(1, INTER, scale=3), randn(1, INTER), torch.empty(1, INTER, dtype=BF16)
    out["SiLU(gate) * up [1, 8960]"] = (
        "layer_ops", lambda: F.silu(gate) * up, lambda: layer_ops.silu_mul(gate, up),
        lambda lib: lambda: lib.silu_mul(ptr(gate), INTER, ptr(up), INTER, ptr(act), 1, INTER, t))

    for ctx in (300, 2000):
        blocks = -(-ctx // BLOCK) + 1
        k_cache, v_cache = randn(blocks, BLOCK, HKV, DH), randn(blocks, BLOCK, HKV, DH)
        ctx_slots = torch.arange(ctx)[None]  # one sequence in consecutive blocks: torch's best case (no gather)
        batch = PagedBatch(slot_mapping=ctx_slots[:, -1].clone(), q_starts=[0], q_lens=[1], ctx_lens=[ctx],
                           ctx_slots=ctx_slots, ctx_lens_t=torch.tensor([ctx]), ctx_run=0)
        q, k, v = qkv.view(1, -1, DH).split([HQ, HKV, HKV], 1)
        o = torch.empty(1, HQ, DH, dtype=BF16)

        def torch_decode(q=q, k=k, v=v, kc=k_cache, vc=v_cache, b=batch):
            for cache, new in ((kc, k), (vc, v)):  # KVCache.write
                cache.view(-1, HKV, DH).index_copy_(0, b.slot_mapping, new)
            return paged_attention(q, k, v, kc, vc, b)

        def ours_decode(q=q, k=k, v=v, kc=k_cache, vc=v_cache, b=batch):
            return layer_ops.paged_decode(q, k, v, kc, vc, b.slot_mapping, b.ctx_slots, b.ctx_lens_t)

        def raw_decode(lib, q=q, k=k, v=v, kc=k_cache, vc=v_cache, b=batch, o=o):
            return lambda: lib.paged_decode(ptr(q), q.stride(0), ptr(k), k.stride(0), ptr(v), v.stride(0), ptr(kc),
                                            ptr(vc), ptr(b.slot_mapping), ptr(b.ctx_slots), b.ctx_slots.stride(0),
                                            ptr(b.ctx_lens_t), ptr(o), 1, HQ, HKV, DH, t)

        out[f"k/v write + attention, {ctx} tokens"] = ("paged_decode", torch_decode, ours_decode, raw_decode)

    h = in_place(randn(PATCHES, VMLP, scale=3))
    out["QuickGELU [1024, 5120]"] = (
        "vision_ops", lambda: h * torch.sigmoid(1.702 * h), lambda: vision_ops.quick_gelu_(h),
        lambda lib: lambda: lib.quick_gelu(ptr(h), h.numel(), t))

    vqkv, (vcos, vsin) = in_place(randn(PATCHES, 3 * VHEADS * VDH)), cos_sin(PATCHES, VDH, torch.float32)
    vq, vk, _ = vqkv.view(PATCHES, 3, VHEADS, VDH).unbind(1)
    out["vision rotary q, k [1024, 2 x 16 x 80]"] = (
        "vision_ops",
        lambda: (apply_rotary(vq.float(), vcos, vsin).to(BF16), apply_rotary(vk.float(), vcos, vsin).to(BF16)),
        lambda: vision_ops.rotary_(vqkv, vcos, vsin, 2 * VHEADS, VDH),
        lambda lib: lambda: lib.vision_rotary(ptr(vqkv), vqkv.stride(0), ptr(vcos), ptr(vsin), PATCHES, 2 * VHEADS,
                                              VDH, t))

    scores = randn(VHEADS, PATCHES, PATCHES, scale=4)
    work = in_place(scores.clone())

    def raw_softmax(lib):
        lanes = [vision_ops.TORCH_LANES] if len(lib.softmax_rows.argtypes) == 5 else []  # a build before its lanes
        return lambda: lib.softmax_rows(ptr(work), VHEADS * PATCHES, PATCHES, *lanes, t)

    out["softmax [16, 1024, 1024]"] = (
        "vision_ops", lambda: torch.softmax(scores, -1), lambda: vision_ops.softmax_(work), raw_softmax)
    return out


def per_call_us(fn, budget_s=0.02, clock=time.perf_counter) -> float:
    """Microseconds per call of fn, timed over about budget_s of `clock`."""
    fn()
    n, t0 = 0, clock()
    while (elapsed := clock() - t0) < budget_s:
        fn()
        n += 1
    return elapsed / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--baseline", help="a git revision whose kernels to time too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    here = isa.current()
    print(f"tier {here.tier} (cap {here.cap}), torch {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; medians of {args.rounds} rounds, us per call ({clock.__name__})")
    assert layer_ops.available() and vision_ops.library() is not None, "no kernels at this tier"
    base = baseline_native(args.baseline) if args.baseline else None
    methods = ["torch", "ours"] + (["kernel", "baseline"] if base else [])
    print(f"{'op':40}" + "".join(f"{m:>10}" for m in methods) + f"{'torch/ours':>12}"
          + (f"{'base/kernel':>12}" if base else ""))
    with torch.inference_mode():
        for name, (lib, torch_fn, ours_fn, raw) in cases().items():
            calls = {"torch": torch_fn, "ours": ours_fn}
            if base and base.library(lib) is not None:  # bare calls: both builds timed alike (no wrapper)
                calls |= {"kernel": raw(native.library(lib)), "baseline": raw(base.library(lib))}
            runs = {m: [] for m in calls}
            for _ in range(args.rounds):
                for m in runs:
                    restore()
                    runs[m].append(per_call_us(calls[m], clock=clock))
            med = {m: statistics.median(r) for m, r in runs.items()}
            line = f"{name:40}" + "".join(f"{med[m]:10.1f}" if m in med else f"{'-':>10}" for m in methods)
            line += f"{med['torch'] / med['ours']:11.1f}x"
            print(line + (f"{med['baseline'] / med['kernel']:11.2f}x" if "baseline" in med else ""))


if __name__ == "__main__":
    main()
