"""Speed of the decoder's linears, bf16 / int8 / int4, at the Qwen2-VL-2B shapes, vs memory bandwidth.

For each weight shape and row count it times every method on *cold* weights: a pass calls the
method once on each of many copies of the weight (> 1 GB in all, far past L2/L3), as a decode
step does going through 28 layers. Methods are interleaved round by round; rounds during which
any other process used the CPU are discarded (other processes share this 2-core VM, and one busy
neighbour stalls a 2-thread call for a scheduler slice); the median clean round is reported.
Printed: GB/s of weight bytes streamed (scales and zero points included), the ratio to the read
bandwidth probed in the same process, and, from the per-shape times, the linears-only time of
one 2B decode step, with q/k/v and gate/up as separate calls or fused into one.

    python -m benchmarks.linear_decode [--rounds 9] [--rows 1,4,283] [--methods a,b] [--alternatives]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.bandwidth import GIB, others_cpu_ticks, probe
from qwen2vl.backends.cpu.linear import FastLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear

D, I, KV, VOCAB, LAYERS = 1536, 8960, 256, 151936, 28
SHAPES = {  # name: (out, in, bias)
    "q/o": (D, D, True), "k/v": (KV, D, True), "gate/up": (I, D, False), "down": (D, I, False),
    "head": (VOCAB, D, False), "qkv fused": (D + 2 * KV, D, True), "gate+up fused": (2 * I, D, False),
}
# calls per decode step of the 2B (o_proj has no bias but streams the same bytes as q_proj)
READ = "read probe: 1 GiB fp32 sum"
STEP_SEPARATE = {"q/o": 2 * LAYERS, "k/v": 2 * LAYERS, "gate/up": 2 * LAYERS, "down": LAYERS, "head": 1}
STEP_FUSED = {"qkv fused": LAYERS, "q/o": LAYERS, "gate+up fused": LAYERS, "down": LAYERS, "head": 1}


class Call(nn.Module):
    """A bare function of (x, weight) as a module, for the alternatives measured against FastLinear."""

    def __init__(self, fn, weight):
        super().__init__()
        self.fn = fn
        self.register_buffer("weight", weight)

    def forward(self, x):
        return self.fn(x, self.weight)


def inductor_matvec(x, weight):  # the best inductor formulation found: rows outer, k innermost
    return (weight[:, None, :].float() * x[None].float()).sum(-1).t().to(x.dtype)


_compiled_matvec = torch.compile(inductor_matvec, dynamic=True)


class DynamicInt8(nn.Module):
    """Not weight-only: int8 weights *and* int8 activations (one scale per call, quantized on the
    fly) through oneDNN's VNNI GEMM, llama.cpp Q8_0's recipe. Measured to see what int8 can give."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q = Int8Linear.from_linear(linear, blocked=False)
        self.packed = torch.ops.onednn.qlinear_prepack(q.weight, [1, linear.in_features])
        self.scales, self.zero_points = q.scales.float(), torch.zeros(linear.out_features, dtype=torch.long)

    def forward(self, x):
        # uint8 activations with zero point 128: oneDNN's VNNI path (int8 ones take a path ~700x slower)
        s = float(x.abs().amax()) / 127
        qx = (torch.round(x.float() / s) + 128).clamp(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            qx, s, 128, self.packed, self.scales, self.zero_points, None, 1.0, 0, x.dtype, "none", [], "")

METHODS = {
    "F.linear bf16": lambda lin: lin,  # what transformers runs
    "FastLinear bf16": FastLinear.from_linear,  # our bf16 kernel (backends/cpu/csrc/bf16_gemm.c)
    "FastLinear oneDNN": lambda lin: FastLinear.from_linear(lin, use_kernel=False),
    "Int8Linear": lambda lin: Int8Linear.from_linear(lin, blocked=False),  # torch's kernels
    "Int4Linear g32": lambda lin: Int4Linear.from_linear(lin, 32, blocked=False),
    "Int4Linear g128": lambda lin: Int4Linear.from_linear(lin, 128, blocked=False),
    # ours (backends/cpu/csrc/int_gemv.c): int8 activations per block of 32, VNNI dot products
    "Int8Linear VNNI": lambda lin: Int8Linear.from_linear(lin, blocked=True),
    "Int4Linear g32 VNNI": lambda lin: Int4Linear.from_linear(lin, 32, blocked=True),
    "Int4Linear g128 VNNI": lambda lin: Int4Linear.from_linear(lin, 128, blocked=True),
}
ALTERNATIVES = {
    "torch.mv bf16": lambda lin: Call(lambda x, w: torch.mv(w, x[0])[None] if x.shape[0] == 1 else x @ w.t(),
                                      lin.weight),
    "inductor matvec bf16": lambda lin: Call(_compiled_matvec, lin.weight),
    # the int8 kernel without the per-row scale, an upper bound on inductor's int8 speed
    "inductor matvec int8": lambda lin: Call(_compiled_matvec, Int8Linear.from_linear(lin, blocked=False).weight),
    "W8A8 oneDNN (int8 activations)": DynamicInt8,
}


def module_bytes(m: nn.Module) -> int:
    """Bytes a call streams: parameters, buffers and a FastLinear's reordered weight."""
    tensors = [*m.parameters(), *m.buffers()]
    packed = getattr(m, "packed", None)
    if isinstance(m, FastLinear) and packed is not None:  # reordered weights: not buffers
        tensors.append(packed)
    return sum(t.numel() * t.element_size() for t in tensors)


def copies(make, linear: nn.Linear, min_bytes: float) -> tuple[list[nn.Module], int]:
    """Enough independent copies of one method's module that a pass over them is cold."""
    first = make(linear)
    nbytes = module_bytes(first)
    out = [first]
    for _ in range(max(1, int(min_bytes // nbytes))):
        try:
            out.append(copy.deepcopy(first))
        except RuntimeError:  # oneDNN's opaque tensors don't deepcopy: rebuild from a fresh weight
            fresh = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
            fresh.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            fresh.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
            out.append(make(fresh))
    return out, nbytes


def time_methods(linear, rows, methods, rounds, min_bytes, max_tries=10):
    """Median seconds per call of each method over `rounds` rounds that no other process shared."""
    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
    runs = {name: copies(methods[name], linear, min_bytes) for name in methods}
    # the bandwidth yardstick, timed inside the same clean rounds: this VM's memory speed drifts
    # by 2x within minutes, so a probe taken before or after is no denominator
    src = torch.ones(GIB // 4)
    runs[READ] = ([lambda _: src.sum()], GIB)
    for mods, _ in runs.values():
        mods[0](x)  # compile, warm up
    seconds = {name: [] for name in runs}
    clean = 0
    for _ in range(rounds * max_tries):
        ticks = others_cpu_ticks()
        round_seconds = {}
        for name, (mods, _) in runs.items():
            t = time.perf_counter()
            for m in mods:
                m(x)
            round_seconds[name] = (time.perf_counter() - t) / len(mods)
        if others_cpu_ticks() - ticks <= 1:  # a tick is 10 ms: allow a daemon's blip
            clean += 1
            for name, sec in round_seconds.items():
                seconds[name].append(sec)
        if clean == rounds:
            break
    if clean == 0:  # never quiet: report the contended times, and say so
        print(f"| (no quiet round in {rounds * max_tries}: contended times follow) |")
        seconds = {name: [round_seconds[name]] for name in runs}
    return {name: (statistics.median(s), runs[name][1]) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", default="1,4,283")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"from {[*METHODS, *ALTERNATIVES]}")
    parser.add_argument("--alternatives", action="store_true", help="also time torch.mv and inductor kernels")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--cold-bytes", type=float, default=1.0e9, help="weight bytes per cold pass")
    parser.add_argument("--max-tries", type=int, default=10, help="rounds tried per clean round wanted")
    args = parser.parse_args()
    methods = {name: {**METHODS, **ALTERNATIVES}[name] for name in args.methods.split(",")}
    if args.alternatives:
        methods.update(ALTERNATIVES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    before = probe()
    print(f"probe before: {before}\n")
    print("| shape (out x in) | rows | method | us/call | weight GB/s | % of read probe | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    step = {}  # (rows, method) -> {shape: seconds per call}
    for rows in [int(r) for r in args.rows.split(",")]:
        min_bytes = args.cold_bytes if rows <= 16 else 0  # prefill is compute-bound: 2 copies do
        for name in args.shapes.split(","):
            if rows > 16 and name == "head":
                continue  # prefill computes logits for the last token only
            out, inp, bias = SHAPES[name]
            torch.manual_seed(0)
            linear = nn.Linear(inp, out, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
            # the alternatives are decode kernels, and the head would only add minutes and GBs
            use = {k: v for k, v in methods.items() if k not in ALTERNATIVES or (rows <= 16 and name != "head")}
            with torch.no_grad():
                results = time_methods(linear, rows, use, args.rounds, min_bytes, args.max_tries)
            read_gbs = GIB / results.pop(READ)[0] / 1e9
            print(f"| {name} {out}x{inp} | {rows} | {READ} | - | {read_gbs:.1f} | 100% | - |")
            for method, (sec, nbytes) in results.items():
                gbs = nbytes / sec / 1e9
                print(f"| {name} {out}x{inp} | {rows} | {method} | {sec * 1e6:.0f} | {gbs:.1f} | "
                      f"{100 * gbs / read_gbs:.0f}% | {2 * rows * out * inp / sec / 1e9:.0f} |", flush=True)
                step.setdefault((rows, method), {})[name] = sec
            del linear, results
    print(f"\nprobe after: {probe()}")
    print_step_table(step)
    with torch.no_grad():
        print_quality()


def print_quality() -> None:
    """Relative output error vs the bf16 linear, on Gaussian weights with a few outlier columns."""
    print("\n| format | bytes/weight (gate 8960x1536) | rel. RMS error of outputs vs bf16 | max abs error / RMS |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(D, I, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    w = torch.randn(I, D, generator=g) * 0.02
    w[:, torch.randperm(D, generator=g)[:16]] *= 10  # real checkpoints have outlier input channels
    linear.weight.copy_(w)
    x = torch.randn(64, D, generator=g).to(torch.bfloat16)
    ref = linear(x).float()
    rms = ref.pow(2).mean().sqrt()
    for name in ["Int8Linear", "Int8Linear VNNI", "Int4Linear g32", "Int4Linear g32 VNNI", "Int4Linear g128",
                 "Int4Linear g128 VNNI", "W8A8 oneDNN (int8 activations)"]:
        q = {**METHODS, **ALTERNATIVES}[name](linear)
        err = (q(x).float() - ref)
        print(f"| {name} | {module_bytes(q) / (I * D):.3f} | {(err.pow(2).mean().sqrt() / rms).item():.4f} | "
              f"{(err.abs().max() / rms).item():.3f} |")


def step_ms(times: dict[str, float], calls: dict[str, int]) -> float | None:
    """Linears-only milliseconds of one decode step, if every shape it needs was timed."""
    return sum(times[s] * n for s, n in calls.items()) * 1e3 if calls.keys() <= times.keys() else None


def print_step_table(step) -> None:
    print("\n| rows | method | step ms, separate | step ms, fused q/k/v + gate/up | speed-up vs F.linear (fused) |")
    print("|---|---|---|---|---|")
    for (rows, method), times in step.items():
        sep, fused = step_ms(times, STEP_SEPARATE), step_ms(times, STEP_FUSED)
        base = step_ms(step.get((rows, "F.linear bf16"), {}), STEP_FUSED)
        if sep is None and fused is None:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"| {rows} | {method} | {fmt(sep)} | {fmt(fused)} | "
              f"{f'{base / fused:.2f}x' if base and fused else '-'} |")

if __name__ == "__main__":
    main()
