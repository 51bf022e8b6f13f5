/* The small bf16 ops of a decoder layer, one C call each: RMSNorm (with the residual add before it),
 * rotary and SiLU * up (decode attention over the paged KV cache is paged_decode.c).
 *
 * At batch 1 each of these is a handful of torch ops on a few thousand values, and each op costs a
 * few microseconds of dispatch: ~180 us per layer of the 2B, ~5 ms per decode step. Here each is one
 * call. The elementwise kernels round where torch rounds: a bf16 op in torch computes in fp32 and
 * rounds its result to bf16 (nearest even), so every intermediate that torch keeps in bf16 is rounded
 * here too (the comment above each function lists them). All tensors are bf16 with contiguous rows;
 * row strides are passed where the rows are views into a wider output (q|k|v, gate|up).
 * Built by qwen2vl/kernels/layer_ops.py.
 */
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>


/* The elementwise kernels split their rows across threads above this many values; below, they run
 * without OpenMP, whose team setup (~0.5 us a call, even under if(0)) costs more than a decode row. */
#define PARALLEL_MIN 65536

#include "bf16_simd.h" /* f32x16 and its operations, for AVX-512 or AVX2 */


/* acc + the squares of 8 values: a square of a bf16 is exact in fp32, so one FMA rounds as torch's
 * square-then-add does */
static inline f32x8 add_squares(f32x8 acc, const bf16 *p) {
    const f32x8 a = load8(p);
    return vfma8(a, a, acc);
}

/* sum(v^2) in the order of torch's fp32 sum (cascade_sum in aten's SumKernel.cpp, which runs on
 * 8-wide vectors here even on AVX-512 CPUs, as measured): the row's vectors taken as rows of 4, one
 * accumulator per column, cascaded through 4 levels every 16 steps; leftover vectors into the first
 * column, the columns added in order, then the scalar tail and the 8 lanes one by one. Any other
 * order changes the scale's last fp32 bit now and then, and an output's last bf16 bit about once
 * in 10^5 values. (Rows shorter than 8, which torch sums in scalar code, may still differ.) */
static float sum_squares(const bf16 *v, int64_t D) {
    f32x8 acc[4][4];
    for (int l = 0; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[l][k] = vzero8();
    const int64_t nvec = D / 8, steps = nvec / 4;
    int64_t i = 0;
    while (i + 16 <= steps) {
        for (int j = 0; j < 16; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = add_squares(acc[0][k], v + (i * 4 + k) * 8);
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) acc[l][k] = vadd8(acc[l][k], acc[l - 1][k]);
            for (int k = 0; k < 4; k++) acc[l - 1][k] = vzero8();
            if (i & (15 << (4 * l))) break;
        }
    }
    for (; i < steps; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = add_squares(acc[0][k], v + (i * 4 + k) * 8);
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] = vadd8(acc[0][k], acc[l][k]);
    for (int64_t r = steps * 4; r < nvec; r++) acc[0][0] = add_squares(acc[0][0], v + r * 8);
    for (int k = 1; k < 4; k++) acc[0][0] = vadd8(acc[0][0], acc[0][k]);
    float lanes[8], s = 0;
    storef8(lanes, acc[0][0]);
    for (int64_t j = nvec * 8; j < D; j++) {
        uint32_t bits = (uint32_t)v[j] << 16;
        float a;
        memcpy(&a, &bits, 4);
        s += a * a;
    }
    for (int k = 0; k < 8; k++) s += lanes[k];
    return s;
}

/* RMSNorm of the rows of x [N, D], text.RMSNorm's rounding order:
 *   out = bf16(w * bf16(v / sqrt(sum(v^2) / D + eps)))
 * With res, v = bf16(x + res) (DecoderLayer's `x + sublayer(x)`) and is also written to sum_out;
 * without, v = x. sum(v^2) is summed in torch's order (sum_squares): torch's result, bit for bit. */
static void rms_norm_row(const bf16 *x, const bf16 *res, bf16 *sum_out, const bf16 *w, bf16 *out, int64_t n,
                         int64_t D, float eps) {
    x += n * D, out += n * D;
    if (res) {
        res += n * D, sum_out += n * D;
        for (int64_t j = 0; j < D; j += 16) {
            const mask16 m = tail(D - j);
            store(sum_out + j, vadd(load(x + j, m), load(res + j, m)), m);
        }
        x = sum_out;
    }
    const f32x16 r = vdiv(vset(1), vsqrt(vset(sum_squares(x, D) / D + eps)));
    for (int64_t j = 0; j < D; j += 16) {
        const mask16 m = tail(D - j);
        store(out + j, vmul(rnd(vmul(load(x + j, m), r)), load(w + j, m)), m);
    }
}

void rms_norm(const bf16 *x, const bf16 *res, bf16 *sum_out, const bf16 *w, bf16 *out, int64_t N, int64_t D,
              float eps, int nthreads) {
    if (N * D < PARALLEL_MIN)
        for (int64_t n = 0; n < N; n++) rms_norm_row(x, res, sum_out, w, out, n, D, eps);
    else
#pragma omp parallel for num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) rms_norm_row(x, res, sum_out, w, out, n, D, eps);
}

static inline f32x16 mul_rnd(f32x16 a, f32x16 b) { return rnd(vmul(a, b)); }

/* Rotary in place on heads 0..H-1 of each row of qk (row stride `stride`, heads of D side by side:
 * the q and k heads of the fused qkv output); cos, sin [N, D]. rotary.apply_rotary's roundings:
 *   x' = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)),  rotate_half(x1, x2) = (-x2, x1)
 * (a product of two bf16 is exact in fp32, so each bf16() is the only rounding of its op). */
static void rotary_row(bf16 *qk, const bf16 *c, const bf16 *s, int64_t H, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < H; h++) {
        bf16 *x = qk + h * D;
        for (int64_t j = 0; j < half; j += 16) {
            const mask16 m = tail(half - j);
            const f32x16 x1 = load(x + j, m), x2 = load(x + half + j, m);
            const f32x16 c1 = load(c + j, m), c2 = load(c + half + j, m);
            const f32x16 s1 = load(s + j, m), s2 = load(s + half + j, m);
            store(x + j, vsub(mul_rnd(x1, c1), mul_rnd(x2, s1)), m);
            store(x + half + j, vadd(mul_rnd(x2, c2), mul_rnd(x1, s2)), m);
        }
    }
}

void rotary(bf16 *qk, int64_t stride, const bf16 *cos, const bf16 *sin, int64_t N, int64_t H, int64_t D,
            int nthreads) {
    if (N * H * D < PARALLEL_MIN)
        for (int64_t n = 0; n < N; n++) rotary_row(qk + n * stride, cos + n * D, sin + n * D, H, D);
    else
#pragma omp parallel for num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) rotary_row(qk + n * stride, cos + n * D, sin + n * D, H, D);
}

/* out [N, I] = bf16(bf16(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in fp32: F.silu(gate) * up.
 * gate and up rows at any stride, so a fused gate|up output [N, 2I] works as well as two tensors. */
static void silu_mul_row(const bf16 *g, const bf16 *u, bf16 *out, int64_t I) {
    for (int64_t j = 0; j < I; j += 16) {
        const mask16 m = tail(I - j);
        const f32x16 a = load(g + j, m);
        const f32x16 e = exp16(vsub(vzero(), a));
        const f32x16 silu = rnd(vdiv(a, vadd(vset(1), e)));
        store(out + j, vmul(silu, load(u + j, m)), m);
    }
}

void silu_mul(const bf16 *g, int64_t g_stride, const bf16 *u, int64_t u_stride, bf16 *out, int64_t N, int64_t I,
              int nthreads) {
    if (N * I < PARALLEL_MIN)
        for (int64_t n = 0; n < N; n++) silu_mul_row(g + n * g_stride, u + n * u_stride, out + n * I, I);
    else
#pragma omp parallel for num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) silu_mul_row(g + n * g_stride, u + n * u_stride, out + n * I, I);
}

