/* The vision tower's elementwise ops on bf16 or fp32 (the `_f32` forms), one C call each: QuickGELU, the 2-D rotary on q and k,
 * and the attention's softmax, all in place.
 *
 * For one 448x448 image (1024 patches, 32 blocks) torch spends ~0.3 s of the tower's ~1.8 s on
 * these on 2 cores: each is several ops that each read and write every value (QuickGELU three,
 * rotary in float32 eight), where one pass does. Each rounds where torch rounds (the comment above
 * each function says where): the results equal torch's bit for bit (tests/test_vision_ops.py).
 * Built by qwen2vl/kernels/vision_ops.py.
 */
#include <math.h>
#include <stdint.h>
#include "kernels.h"

#include "bf16_simd.h" /* f32x16 and its operations, for AVX-512 or AVX2 */


/* Element i.. of bf16 or fp32 x (f32): every op below has both forms, the tower computes in either
 * (bf16 where the CPU has bf16 matmuls, else fp32: backends/cpu/backend.py). */
SIMD f32x16 ld(const void *x, int64_t i, mask16 m, const int f32) {
    return f32 ? loadf((const float *)x + i, m) : load((const bf16 *)x + i, m);
}
SIMD void st(void *x, int64_t i, f32x16 v, mask16 m, const int f32) {
    if (f32) storef((float *)x + i, v, m);
    else store((bf16 *)x + i, v, m);
}
SIMD f32x16 rnd_to(f32x16 v, const int f32) { return f32 ? v : rnd(v); } /* rounded to the tensor's dtype */

/* x * sigmoid(1.702 * x) in place on n values, as torch computes it on bf16 (fp32) tensors:
 *   t = bf16(1.702f * x), s = bf16(1 / (1 + exp(-t))), x' = bf16(x * s)  (fp32: no bf16 roundings) */
SIMD void quick_gelu_any(void *x, int64_t n, const int f32, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i += 16) {
        const mask16 m = tail(n - i);
        const f32x16 v = ld(x, i, m, f32);
        const f32x16 t = rnd_to(vmul(v, vset(1.702f)), f32);
        const f32x16 e = exp16(vsub(vzero(), t));
        const f32x16 s = rnd_to(vdiv(vset(1.0f), vadd(vset(1.0f), e)), f32);
        st(x, i, vmul(v, s), m, f32);
    }
}
void quick_gelu(bf16 *x, int64_t n, int nthreads) { quick_gelu_any(x, n, 0, nthreads); }
void quick_gelu_f32(float *x, int64_t n, int nthreads) { quick_gelu_any(x, n, 1, nthreads); }

/* The tower's rotary on heads 0..H-1 of each row of qkv (row stride `stride`, heads of D side by
 * side: q then k of the [3, heads, D] qkv output), cos and sin float32 [N, D]. As
 * `apply_rotary(q.float(), cos, sin).to(q.dtype)`: in float32, each product and the sum rounded to
 * float32, then (bf16) once to bf16 (no fused multiply-add: the file is built with -ffp-contract=off). */
SIMD void vision_rotary_any(void *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H,
                            int64_t D, const int f32, int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin + n * D;
        for (int64_t h = 0; h < H; h++) {
            const int64_t x = n * stride + h * D; /* the head's first element */
            for (int64_t j = 0; j < half; j += 16) {
                const mask16 m = tail(half - j);
                const f32x16 x1 = ld(qkv, x + j, m, f32), x2 = ld(qkv, x + half + j, m, f32);
                const f32x16 a = vsub(vmul(x1, loadf(c + j, m)), vmul(x2, loadf(s + j, m)));
                const f32x16 b = vadd(vmul(x2, loadf(c + half + j, m)), vmul(x1, loadf(s + half + j, m)));
                st(qkv, x + j, a, m, f32);
                st(qkv, x + half + j, b, m, f32);
            }
        }
    }
}
void vision_rotary(bf16 *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                   int nthreads) {
    vision_rotary_any(qkv, stride, cos, sin, N, H, D, 0, nthreads);
}
void vision_rotary_f32(float *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                       int nthreads) {
    vision_rotary_any(qkv, stride, cos, sin, N, H, D, 1, nthreads);
}

#define SOFTMAX_KEEP 8192 /* rows up to this long keep their exps (32 KB on the stack), longer ones redo them */

/* Softmax in place over each of the R rows of n bf16 (fp32) scores, as torch.softmax on bf16 (aten's
 * _vec_softmax_lastdim): in float32, exp(x - max) times 1 / sum, rounded once to bf16 (fp32: not). The sum in
 * torch's order, which depends on its vector width `lanes` (16 under AVX-512, 8 under AVX2, from
 * torch's CPU capability, not ours): `lanes` accumulators over the first n - n % lanes exps, reduced
 * as its vec_reduce_all (hsum8, hsum), then the rest one by one, whose exps are libm's expf (torch's
 * std::exp: the same function, resolved from the libm the process has loaded). */
SIMD void softmax_any(void *x, int64_t R, int64_t n, int lanes, const int f32, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        const int64_t row = r * n; /* the row's first element */
        float kept[SOFTMAX_KEEP], rest[16];
        const int keep = n <= SOFTMAX_KEEP;
        const int64_t nv = n - n % lanes;
        f32x16 mx = vset(-__builtin_inff());
        for (int64_t j = 0; j < n; j += 16) {
            const mask16 m = tail(n - j);
            mx = vmax(mx, vsel(m, ld(x, row + j, m, f32), vset(-__builtin_inff())));
        }
        const float top = hmax(mx);
        f32x16 acc = vzero();
        f32x8 acc8 = vzero8();
        for (int64_t j = 0; j < nv; j += 16) {
            const mask16 m = tail(nv - j); /* 16 lanes, or 8 at the end of an 8-wide sum */
            const f32x16 e = exp16(vsub(ld(x, row + j, m, f32), vset(top)));
            if (keep) storef(kept + j, e, m);
            if (lanes == 16) {
                acc = vadd(acc, e);
            } else {
                acc8 = vadd8(acc8, lo8(e));
                if (m == FULL) acc8 = vadd8(acc8, hi8(e));
            }
        }
        float sum = lanes == 16 ? hsum(acc) : hsum8(acc8);
        for (int64_t j = nv; j < n; j++) { /* bf16 only: the caller keeps fp32 rows to multiples of lanes */
            const uint32_t bits = (uint32_t)((const bf16 *)x)[row + j] << 16;
            float v;
            __builtin_memcpy(&v, &bits, 4);
            rest[j - nv] = expf(v - top);
            sum += rest[j - nv];
        }
        const f32x16 inv = vset(1.0f / sum);
        for (int64_t j = 0; j < nv; j += 16) {
            const mask16 m = tail(nv - j);
            const f32x16 e = keep ? loadf(kept + j, m) : exp16(vsub(ld(x, row + j, m, f32), vset(top)));
            st(x, row + j, vmul(e, inv), m, f32);
        }
        if (nv < n) st(x, row + nv, vmul(loadf(rest, tail(n - nv)), inv), tail(n - nv), f32);
    }
}
void softmax_rows(bf16 *x, int64_t R, int64_t n, int lanes, int nthreads) { softmax_any(x, R, n, lanes, 0, nthreads); }
/* fp32 rows: torch folds a row's last n % lanes values into its vector sum where the bf16 path adds
 * them one by one, so this takes rows of a multiple of `lanes` only (n % lanes == 0: no tail) */
void softmax_rows_f32(float *x, int64_t R, int64_t n, int lanes, int nthreads) {
    softmax_any(x, R, n, lanes, 1, nthreads);
}
