"""Our GEMM kernels as a CPU of one tier sees them, at the Qwen2-VL-2B shapes (CPU, 2 threads by default).

- decode: the decoder's linears in layer order (qkv 1792x1536 fused, o 1536x1536, gate and up
  8960x1536, down 1536x8960) over enough layers that every pass is cold, M rows (1 by default),
  per method (int8 g128: GPTQ-Int8's groups): GB/s of weights (and scales) streamed, next to the
  read probe timed in the same rounds (this VM's memory drifts between a ~45-53 and a ~75-83 GB/s phase within minutes);
- prefill / vision: GFLOP/s of bf16w_gemm's register tile (float32 x as the vision tower, bf16 x
  as the decoder) against torch's float32 F.linear on a float32 copy of the weight (MKL / oneDNN
  sgemm), interleaved, at vision fc1 5120x1280 with 1024 rows and decoder gate 8960x1536 with 283;
  and the int8 kernels at the same shapes: int_gemv (an int8 model's prefill without AMX: activations
  per block of 32) and int8_mm (activations per row, the matmul="int8" policy); where bf16_gemm is
  built, its AVX-512 BF16 tiles, its AMX tiles where the CPU has them, and torch's bf16 matmul;
  int8_mm's AMX tiles where they are on;
- codes: a quantized model's prefill calls (int8, int8 g128, int4 g32 / g128 weights, bf16 x) at the
  decoder's gate and down shapes and several row counts: int_gemv's tile against the AMX bf16 tiles on the
  codes widened to bf16 (bf16_gemm_codes), which take such calls from gemm.AMX_CODES_ROWS rows (per kind); GFLOP/s.
Methods run interleaved, round by round; rounds during which other processes used the CPU are
reported apart (this VM is shared). Kernels are called through ctypes on preallocated outputs,
as the decode step calls them from C.

Run as an AVX2 CPU (Zen 3-like): every library below the process capped, torch's too:
    QWEN2VL_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python -m benchmarks.cpu_gemm_tier [--rows 1] [--rounds 9] [--part decode,prefill,codes]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.bandwidth import GIB, memory_gbs, others_cpu_ticks
from qwen2vl.backends.cpu import gemm, int8_mm, isa, native, packing
from qwen2vl.backends.int8_groups import Int8GroupLinear
from qwen2vl.backends.quant import Int4Linear, Int8Linear

D, I = 1536, 8960
LAYER = [("qkv", D + 512, D, True), ("o", D, D, False), ("gate", I, D, False), ("up", I, D, False),
         ("down", D, I, False)]  # name, out, in, bias
PREFILL = [("vision fc1", 5120, 1280, 1024), ("decoder gate", I, D, 283)]  # name, out, in, rows


def ptr(t):
    return None if t is None else t.data_ptr()


def decoder_call(method: str, out: int, inp: int, bias: bool, rows: int):
    """(a no-argument call of one linear of `method` on its own weights, the bytes it streams)."""
    lin = nn.Linear(inp, out, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, inp).to(torch.bfloat16)
    y = torch.empty(rows, out, dtype=torch.bfloat16)
    b = None if lin.bias is None else lin.bias.detach().contiguous()
    nt = torch.get_num_threads()
    if method == "bf16w":
        w = packing.pack_bf16(lin.weight)
        fn = gemm.bf16w_library().bf16w_gemm
        return (lambda: fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), ptr(b), 1, rows, out, inp, nt)), w.nbytes
    if method == "bf16 (AVX-512 BF16)":
        w = packing.pack_bf16(lin.weight)
        fn = gemm.bf16_library().bf16_gemm
        return (lambda: fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), ptr(b), rows, out, inp, nt)), w.nbytes
    lib = gemm.int_library()
    if method == "int8":
        q = Int8Linear.from_linear(lin, blocked=True)
        w, s = q.weight, q.scales
        return (lambda: lib.int8_gemm(w.data_ptr(), s.data_ptr(), 1, x.data_ptr(), y.data_ptr(), ptr(b), 1, rows,
                                      out, inp, nt)), w.nbytes + s.nbytes
    if method == "int8 g128":  # GPTQ-Int8's 8 bits per group, float32 scales and zeros as repack.py keeps them
        g = torch.Generator().manual_seed(out)
        codes = torch.randint(0, 256, (out, inp), dtype=torch.uint8, generator=g)
        sz = torch.rand(out, inp // 128, generator=g) * 1e-3
        q = Int8GroupLinear.from_codes(codes, sz, sz, b, 128)
        w, s = q.weight, q.scales_zeros
        return (lambda: lib.int8g_gemm(w.data_ptr(), s.data_ptr(), 0, x.data_ptr(), y.data_ptr(), ptr(b), 1, rows,
                                       out, inp, 128, nt)), w.nbytes + s.nbytes
    group = int(method.split("g")[-1])
    q = Int4Linear.from_linear(lin, group, blocked=True)
    w, s = q.packed, q.scales_zeros
    return (lambda: lib.int4_gemm(w.data_ptr(), s.data_ptr(), 1, x.data_ptr(), y.data_ptr(), ptr(b), 1, rows, out,
                                  inp, group, nt)), w.nbytes + s.nbytes


def rounds(calls: dict, n: int, max_tries: int = 4):
    """{name: ([seconds of clean rounds], [seconds of all rounds])}: each round runs every entry of
    `calls` (name -> list of no-argument calls) once, in turn."""
    out = {name: ([], []) for name in calls}
    for _ in range(n * max_tries):
        ticks = others_cpu_ticks()
        took = {}
        for name, fns in calls.items():
            t = time.perf_counter()
            for fn in fns:
                fn()
            took[name] = time.perf_counter() - t
        clean = others_cpu_ticks() - ticks <= 1  # a tick is 10 ms: a daemon's blip allowed
        for name, sec in took.items():
            out[name][1].append(sec)
            if clean:
                out[name][0].append(sec)
        clean_rounds, all_rounds = (len(v) for v in next(iter(out.values())))
        if clean_rounds >= n or (all_rounds >= n and all_rounds >= n * max_tries):
            break
    return out


def medians(clean_all, per_second: float) -> tuple[str, str, str, int, int]:
    """`per_second` / the median seconds of the clean rounds, of all rounds, and / the fastest round
    (on a busy VM the least disturbed one), and the rounds' counts."""
    clean, every = clean_all
    rate = lambda sec: f"{per_second / statistics.median(sec):.1f}" if sec else "-"
    return rate(clean), rate(every), f"{per_second / min(every):.1f}", len(clean), len(every)


def decode(rows: int, n_rounds: int, min_bytes: float) -> None:
    methods = ["bf16w", "int8", "int8 g128", "int4 g32", "int4 g128"]
    if gemm.bf16_library() is not None:
        methods.insert(1, "bf16 (AVX-512 BF16)")
    if gemm.int_library() is None or gemm.bf16w_library() is None:
        raise SystemExit("no kernels at this tier")
    source = native.variant("int_gemv")[0]
    print(f"\n## decode, {rows} row(s), layer order; int kernel: {source}\n")
    calls, nbytes, nlayers = {}, {}, {}
    for m in methods:
        layer = [decoder_call(m, out, inp, bias, rows) for _, out, inp, bias in LAYER]
        per_layer = sum(b for _, b in layer)
        layers = [layer] + [[decoder_call(m, out, inp, bias, rows) for _, out, inp, bias in LAYER]
                            for _ in range(int(min_bytes // per_layer))]
        calls[m] = [fn for lay in layers for fn, _ in lay]
        nbytes[m], nlayers[m] = per_layer * len(layers), len(layers)
        calls[m][0]()  # build, warm up
    src = torch.ones(GIB // 4)
    calls["read probe"], nbytes["read probe"] = [lambda: src.sum()], GIB
    res = rounds(calls, n_rounds)
    print("| method | weight bytes per pass | GB/s: median, clean rounds | all | best round | clean / all rounds |")
    print("|---|---|---|---|---|---|")
    for m, r in res.items():
        c, a, b, nc, na = medians(r, nbytes[m] / 1e9)
        print(f"| {m} | {nbytes[m] / 1e6:.0f} MB | {c} | {a} | {b} | {nc} / {na} |")
    # time per decoder layer relative to int8's in the same round (all rounds: neighbours share the disturbance)
    per_layer = lambda m, sec: sec / nlayers[m]
    paired = {m: statistics.median(per_layer(m, t) / per_layer("int8", b) for t, b in zip(r[1], res["int8"][1]))
              for m, r in res.items() if m not in ("int8", "read probe")}
    print("\ntime per layer over int8's, median of the rounds' ratios: "
          + ", ".join(f"{m} {x:.3f}" for m, x in paired.items()))


def prefill_shape(name: str, out: int, inp: int, rows: int, n_rounds: int) -> None:
    w = (torch.randn(out, inp) * 0.05).to(torch.bfloat16)
    w32, packed = w.float(), packing.pack_bf16(w)
    x32 = torch.randn(rows, inp)
    x16, y32, y16 = x32.to(torch.bfloat16), torch.empty(rows, out), torch.empty(rows, out, dtype=torch.bfloat16)
    fn, nt = gemm.bf16w_library().bf16w_gemm, torch.get_num_threads()
    calls = {
        "bf16w, float32 x": [lambda: fn(packed.data_ptr(), x32.data_ptr(), y32.data_ptr(), None, 0, rows, out, inp,
                                        nt)],
        "bf16w, bf16 x": [lambda: fn(packed.data_ptr(), x16.data_ptr(), y16.data_ptr(), None, 1, rows, out, inp, nt)],
        # F.linear's GEMM (addmm on the transposed weight), into a preallocated output like ours
        "torch F.linear float32": [lambda: torch.mm(x32, w32.t(), out=y32)],
    }
    lin = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    lin.weight.copy_(w)
    q8 = Int8Linear.from_linear(lin, blocked=True)
    if gemm.int_library() is not None:  # int8 weights x int8 activations: W8A8 as the quantized models run it
        ilib = gemm.int_library()
        calls["int8 (int_gemv), bf16 x"] = [lambda: ilib.int8_gemm(q8.weight.data_ptr(), q8.scales.data_ptr(), 1,
                                                                   x16.data_ptr(), y16.data_ptr(), None, 1, rows, out,
                                                                   inp, nt)]
    if (mmlib := int8_mm.library()) is not None:  # the same codes, activations per row: the matmul="int8" policy
        w8, s8 = q8.weight, q8.scales

        def mm(x, y, io_bf16, amx=False):  # the AMX tiles, like bf16_gemm's, are one switch in the library
            mmlib.int8_mm_amx(1 if amx else 0)
            mmlib.int8_mm(w8.data_ptr(), s8.data_ptr(), 1, x.data_ptr(), y.data_ptr(), None, io_bf16, rows, out,
                          inp, nt)

        calls["int8_mm (per-row x), bf16 x"] = [lambda: mm(x16, y16, 1)]
        calls["int8_mm (per-row x), float32 x"] = [lambda: mm(x32, y32, 0)]
        if mmlib.amx:
            calls["int8_mm, AMX tiles, bf16 x"] = [lambda: mm(x16, y16, 1, amx=True)]
    if (lib := gemm.bf16_library()) is not None:
        # the AMX tiles are one switch in the library: each call sets it (a syscall, microseconds)
        def bf16(amx: bool):
            lib.bf16_gemm_amx(1 if amx else 0)
            lib.bf16_gemm(packed.data_ptr(), x16.data_ptr(), y16.data_ptr(), None, rows, out, inp, nt)

        calls["bf16 (AVX-512 BF16)"] = [lambda: bf16(False)]
        if amx_granted(lib):
            calls["bf16 (AMX tiles)"] = [lambda: bf16(True)]
        calls["torch F.linear bf16"] = [lambda: torch.mm(x16, w.t(), out=y16)]  # oneDNN: its own AMX where there is
    for fns in calls.values():
        fns[0]()
    for m, r in rounds(calls, n_rounds).items():
        c, a, b, nc, na = medians(r, 2 * rows * out * inp / 1e9)
        print(f"| {name} {out}x{inp} | {rows} | {m} | {c} | {a} | {b} | {nc} / {na} |")
    if lib is not None:
        lib.bf16_gemm_amx(1 if lib.amx else 0)  # back as the process had it
    if mmlib is not None:
        mmlib.int8_mm_amx(1 if mmlib.amx else 0)


CODES = [("decoder gate", I, D), ("decoder down", D, I)]  # name, out, in
CODE_ROWS = (8, 16, 24, 32, 64, 283)


def codes_call(method: str, out: int, inp: int, rows: int, amx: bool):
    """A no-argument call of `method`'s quantized linear on `rows` bf16 rows: int_gemv's kernel, or the
    AMX bf16 tiles on its codes (bf16_gemm_codes)."""
    lin = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, inp).to(torch.bfloat16)
    y = torch.empty(rows, out, dtype=torch.bfloat16)
    nt, ilib, blib = torch.get_num_threads(), gemm.int_library(), gemm.bf16_library()
    if method == "int8":
        q = Int8Linear.from_linear(lin, blocked=True)
        w, s, kind, group, fn = q.weight, q.scales, gemm.INT8, gemm.QK, ilib.int8_gemm
    elif method == "int8 g128":
        g = torch.Generator().manual_seed(out)
        c = torch.randint(0, 256, (out, inp), dtype=torch.uint8, generator=g)
        sz = torch.rand(out, inp // 128, generator=g) * 1e-3
        q = Int8GroupLinear.from_codes(c, sz, sz, None, 128)
        w, s, kind, group, fn = q.weight, q.scales_zeros, gemm.INT8G, 128, ilib.int8g_gemm
    else:
        group = int(method.split("g")[-1])
        q = Int4Linear.from_linear(lin, group, blocked=True)
        w, s, kind, fn = q.packed, q.scales_zeros, gemm.INT4, ilib.int4_gemm
    sbf = s.dtype == torch.bfloat16
    if amx:
        return lambda: blib.bf16_gemm_codes(kind, w.data_ptr(), s.data_ptr(), sbf, x.data_ptr(), y.data_ptr(), None,
                                            rows, out, inp, group, nt)
    extra = () if kind == gemm.INT8 else (group,)
    return lambda: fn(w.data_ptr(), s.data_ptr(), sbf, x.data_ptr(), y.data_ptr(), None, 1, rows, out, inp, *extra, nt)


def codes(n_rounds: int) -> None:
    print("\n## a quantized model's prefill calls (bf16 x): GFLOP/s; AMX by default from "
          f"{gemm.AMX_CODES_ROWS[gemm.INT8]} rows (int8), {gemm.AMX_CODES_ROWS[gemm.INT4]} (int4, int8 g128)\n")
    if gemm.amx_codes_library() is None or gemm.int_library() is None:
        print("no AMX tiles here (or no int_gemv): nothing to compare")
        return
    print("| shape | rows | weights | int_gemv | AMX tiles on the codes | AMX / int_gemv |")
    print("|---|---|---|---|---|---|")
    for name, out, inp in CODES:
        for rows in CODE_ROWS:
            for method in ("int8", "int8 g128", "int4 g32", "int4 g128"):
                calls = {amx: [codes_call(method, out, inp, rows, amx)] for amx in (False, True)}
                for fns in calls.values():
                    if fns[0]() != 0:
                        raise SystemExit(f"{method}: the kernel failed")
                res = {amx: medians(r, 2 * rows * out * inp / 1e9)[0] for amx, r in rounds(calls, n_rounds).items()}
                ratio = float(res[True]) / float(res[False]) if "-" not in res.values() else float("nan")
                print(f"| {name} {out}x{inp} | {rows} | {method} | {res[False]} | {res[True]} | {ratio:.2f} |")


def amx_granted(lib) -> bool:
    """Whether `lib` is bf16_gemm's AMX variant and Linux grants the tile state (left as it was)."""
    if "amx_bf16" not in lib.variant[1]:
        return False
    granted = bool(lib.bf16_gemm_amx(1))
    lib.bf16_gemm_amx(1 if lib.amx else 0)
    return granted


def prefill(n_rounds: int) -> None:
    print("\n## prefill / vision: GFLOP/s\n")
    print("| shape | rows | method | GFLOP/s: median of clean rounds | of all | best round | clean / all rounds |")
    print("|---|---|---|---|---|---|---|")
    for name, out, inp, rows in PREFILL:
        prefill_shape(name, out, inp, rows, n_rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1", help="decode rows, comma-separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", default="decode,prefill")
    ap.add_argument("--min-bytes", type=float, default=400e6, help="weight bytes per cold decode pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    here = isa.current()
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} threads, "
          f"tier {here.tier} (cap {here.cap}), read probe before: {memory_gbs(3)[1]:.1f} GB/s")
    with torch.no_grad():
        if "decode" in args.part:
            for rows in args.rows.split(","):
                decode(int(rows), args.rounds, args.min_bytes)
        if "prefill" in args.part:
            prefill(args.rounds)
        if "codes" in args.part:
            codes(args.rounds)
    print(f"\nread probe after: {memory_gbs(3)[1]:.1f} GB/s")


if __name__ == "__main__":
    main()
