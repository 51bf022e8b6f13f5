/* The vision tower's elementwise bf16 ops, one C call each: QuickGELU, the 2-D rotary on q and k,
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


/* x * sigmoid(1.702 * x) in place on n values, as torch computes it on bf16 tensors:
 *   t = bf16(1.702f * x), s = bf16(1 / (1 + exp(-t))), x' = bf16(x * s) */
void quick_gelu(bf16 *x, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i += 16) {
        const mask16 m = tail(n - i);
        const f32x16 v = load(x + i, m);
        const f32x16 t = rnd(vmul(v, vset(1.702f)));
        const f32x16 e = exp16(vsub(vzero(), t));
        const f32x16 s = rnd(vdiv(vset(1.0f), vadd(vset(1.0f), e)));
        store(x + i, vmul(v, s), m);
    }
}

/* The tower's rotary on heads 0..H-1 of each row of qkv (row stride `stride`, heads of D side by
 * side: q then k of the [3, heads, D] qkv output), cos and sin float32 [N, D]. As
 * `apply_rotary(q.float(), cos, sin).to(bf16)`: in float32, each product and the sum rounded to
 * float32, then once to bf16 (no fused multiply-add: the file is built with -ffp-contract=off). */
void vision_rotary(bf16 *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                   int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin + n * D;
        for (int64_t h = 0; h < H; h++) {
            bf16 *x = qkv + n * stride + h * D;
            for (int64_t j = 0; j < half; j += 16) {
                const mask16 m = tail(half - j);
                const f32x16 x1 = load(x + j, m), x2 = load(x + half + j, m);
                const f32x16 a = vsub(vmul(x1, loadf(c + j, m)), vmul(x2, loadf(s + j, m)));
                const f32x16 b = vadd(vmul(x2, loadf(c + half + j, m)), vmul(x1, loadf(s + half + j, m)));
                store(x + j, a, m);
                store(x + half + j, b, m);
            }
        }
    }
}

#define SOFTMAX_KEEP 8192 /* rows up to this long keep their exps (32 KB on the stack), longer ones redo them */

/* Softmax in place over each of the R rows of n bf16 scores, as torch.softmax on bf16 (aten's
 * _vec_softmax_lastdim): in float32, exp(x - max) times 1 / sum, rounded once to bf16. The sum in
 * torch's order, which depends on its vector width `lanes` (16 under AVX-512, 8 under AVX2, from
 * torch's CPU capability, not ours): `lanes` accumulators over the first n - n % lanes exps, reduced
 * as its vec_reduce_all (hsum8, hsum), then the rest one by one, whose exps are libm's expf (torch's
 * std::exp: the same function, resolved from the libm the process has loaded). */
void softmax_rows(bf16 *x, int64_t R, int64_t n, int lanes, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        bf16 *row = x + r * n;
        float kept[SOFTMAX_KEEP], rest[16];
        const int keep = n <= SOFTMAX_KEEP;
        const int64_t nv = n - n % lanes;
        f32x16 mx = vset(-__builtin_inff());
        for (int64_t j = 0; j < n; j += 16) {
            const mask16 m = tail(n - j);
            mx = vmax(mx, vsel(m, load(row + j, m), vset(-__builtin_inff())));
        }
        const float top = hmax(mx);
        f32x16 acc = vzero();
        f32x8 acc8 = vzero8();
        for (int64_t j = 0; j < nv; j += 16) {
            const mask16 m = tail(nv - j); /* 16 lanes, or 8 at the end of an 8-wide sum */
            const f32x16 e = exp16(vsub(load(row + j, m), vset(top)));
            if (keep) storef(kept + j, e, m);
            if (lanes == 16) {
                acc = vadd(acc, e);
            } else {
                acc8 = vadd8(acc8, lo8(e));
                if (m == FULL) acc8 = vadd8(acc8, hi8(e));
            }
        }
        float sum = lanes == 16 ? hsum(acc) : hsum8(acc8);
        for (int64_t j = nv; j < n; j++) {
            const uint32_t bits = (uint32_t)row[j] << 16;
            float v;
            __builtin_memcpy(&v, &bits, 4);
            rest[j - nv] = expf(v - top);
            sum += rest[j - nv];
        }
        const f32x16 inv = vset(1.0f / sum);
        for (int64_t j = 0; j < nv; j += 16) {
            const mask16 m = tail(nv - j);
            const f32x16 e = keep ? loadf(kept + j, m) : exp16(vsub(load(row + j, m), vset(top)));
            store(row + j, vmul(e, inv), m);
        }
        if (nv < n) store(row + nv, vmul(loadf(rest, tail(n - nv)), inv), tail(n - nv));
    }
}
