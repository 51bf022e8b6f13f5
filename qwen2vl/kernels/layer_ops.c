/* The small bf16 ops of a decoder layer, one C call each: RMSNorm (with the residual add before it),
 * rotary, SiLU * up, and decode attention over the paged KV cache.
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
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

/* The elementwise kernels split their rows across threads above this many values; below, they run
 * without OpenMP, whose team setup (~0.5 us a call, even under if(0)) costs more than a decode row. */
#define PARALLEL_MIN 65536
#define KB 32   /* keys per block of the attention's online softmax */
#define MAXG 16 /* query heads per kv head, at most (checked by the caller) */
#define MAXD 256 /* head dim, at most (checked by the caller) */
#define MAXS 64 /* context splits of one (sequence, kv head), at most */

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include "bf16_simd.h"

int layer_ops_supported(void) { return 1; }

static inline __m256 sq8(const bf16 *p) { /* 8 squares; each exact in fp32 */
    __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_mul_ps(a, a);
}

/* sum(v^2) in the order of torch's fp32 sum (cascade_sum in aten's SumKernel.cpp, which runs on
 * 8-wide vectors here even on AVX-512 CPUs, as measured): the row's vectors taken as rows of 4, one
 * accumulator per column, cascaded through 4 levels every 16 steps; leftover vectors into the first
 * column, the columns added in order, then the scalar tail and the 8 lanes one by one. Any other
 * order changes the scale's last fp32 bit now and then, and an output's last bf16 bit about once
 * in 10^5 values. (Rows shorter than 8, which torch sums in scalar code, may still differ.) */
static float sum_squares(const bf16 *v, int64_t D) {
    __m256 acc[4][4];
    for (int l = 0; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[l][k] = _mm256_setzero_ps();
    const int64_t nvec = D / 8, steps = nvec / 4;
    int64_t i = 0;
    while (i + 16 <= steps) {
        for (int j = 0; j < 16; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq8(v + (i * 4 + k) * 8));
        for (int l = 1; l < 4; l++) {
            for (int k = 0; k < 4; k++) acc[l][k] = _mm256_add_ps(acc[l][k], acc[l - 1][k]);
            for (int k = 0; k < 4; k++) acc[l - 1][k] = _mm256_setzero_ps();
            if (i & (15 << (4 * l))) break;
        }
    }
    for (; i < steps; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], sq8(v + (i * 4 + k) * 8));
    for (int l = 1; l < 4; l++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[l][k]);
    for (int64_t r = steps * 4; r < nvec; r++) acc[0][0] = _mm256_add_ps(acc[0][0], sq8(v + r * 8));
    for (int k = 1; k < 4; k++) acc[0][0] = _mm256_add_ps(acc[0][0], acc[0][k]);
    float lanes[8], s = 0;
    _mm256_storeu_ps(lanes, acc[0][0]);
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
            const __mmask16 m = tail(D - j);
            store(sum_out + j, _mm512_add_ps(load(x + j, m), load(res + j, m)), m);
        }
        x = sum_out;
    }
    const __m512 r = _mm512_div_ps(_mm512_set1_ps(1), _mm512_sqrt_ps(_mm512_set1_ps(sum_squares(x, D) / D + eps)));
    for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail(D - j);
        store(out + j, _mm512_mul_ps(rnd(_mm512_mul_ps(load(x + j, m), r)), load(w + j, m)), m);
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

static inline __m512 mul_rnd(__m512 a, __m512 b) { return rnd(_mm512_mul_ps(a, b)); }

/* Rotary in place on heads 0..H-1 of each row of qk (row stride `stride`, heads of D side by side:
 * the q and k heads of the fused qkv output); cos, sin [N, D]. rotary.apply_rotary's roundings:
 *   x' = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)),  rotate_half(x1, x2) = (-x2, x1)
 * (a product of two bf16 is exact in fp32, so each bf16() is the only rounding of its op). */
static void rotary_row(bf16 *qk, const bf16 *c, const bf16 *s, int64_t H, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < H; h++) {
        bf16 *x = qk + h * D;
        for (int64_t j = 0; j < half; j += 16) {
            const __mmask16 m = tail(half - j);
            const __m512 x1 = load(x + j, m), x2 = load(x + half + j, m);
            const __m512 c1 = load(c + j, m), c2 = load(c + half + j, m);
            const __m512 s1 = load(s + j, m), s2 = load(s + half + j, m);
            store(x + j, _mm512_sub_ps(mul_rnd(x1, c1), mul_rnd(x2, s1)), m);
            store(x + half + j, _mm512_add_ps(mul_rnd(x2, c2), mul_rnd(x1, s2)), m);
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
        const __mmask16 m = tail(I - j);
        const __m512 a = load(g + j, m);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), a));
        const __m512 silu = rnd(_mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1), e)));
        store(out + j, _mm512_mul_ps(silu, load(u + j, m)), m);
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

/* Query heads q [G, D] (fp32, pre-scaled) of one kv head h over the context positions [c0, c1) of
 * one sequence, an online softmax over blocks of KB keys. Writes part [G, D + 2]: per head the
 * unnormalized output, the max score, the sum of exp(score - max) (-inf and 0 when c0 == c1).
 * Each key row is read once into registers for the G heads' dot products, each value row once into
 * an fp32 block, and each head's output is accumulated in registers over the block. Inlined with a
 * constant D (128 for every Qwen2-VL) these loops unroll and keep the rows in registers. */
static inline __attribute__((always_inline)) void attend_part(const float *q, const bf16 *kc, const bf16 *vc,
                                                              const int64_t *slots, int64_t c0, int64_t c1,
                                                              int64_t Hkv, int64_t h, int G, const int64_t D,
                                                              float *part) {
    const int nc = (int)((D + 15) / 16); /* 16-wide chunks of a row */
    float p[MAXG][KB], alpha[MAXG], vf[KB][MAXD];
    for (int g = 0; g < G; g++) {
        memset(part + g * (D + 2), 0, sizeof(float) * (D + 2));
        part[g * (D + 2) + D] = -__builtin_inff();
    }
    for (int64_t c = c0; c < c1; c += KB) {
        const int nb = c1 - c < KB ? (int)(c1 - c) : KB;
        for (int i = 0; i < nb; i++) { /* scores; the value rows to fp32 */
            const bf16 *k = kc + (slots[c + i] * Hkv + h) * D, *v = vc + (slots[c + i] * Hkv + h) * D;
            if (c + KB + i < c1) /* the next block's rows, scattered by slot: fetch them while this one runs */
                for (int64_t j = 0; j < D; j += 32) {
                    __builtin_prefetch(kc + (slots[c + KB + i] * Hkv + h) * D + j);
                    __builtin_prefetch(vc + (slots[c + KB + i] * Hkv + h) * D + j);
                }
            __m512 kr[MAXD / 16];
            for (int j = 0; j < nc; j++) {
                kr[j] = load(k + 16 * j, tail(D - 16 * j));
                _mm512_storeu_ps(vf[i] + 16 * j, load(v + 16 * j, tail(D - 16 * j)));
            }
            for (int g = 0; g < G; g++) {
                __m512 acc = _mm512_setzero_ps();
                for (int j = 0; j < nc; j++)
                    acc = _mm512_fmadd_ps(loadf(q + g * D + 16 * j, tail(D - 16 * j)), kr[j], acc);
                p[g][i] = _mm512_reduce_add_ps(acc);
            }
        }
        for (int g = 0; g < G; g++) { /* p = exp(score - new max); alpha rescales what came before */
            float *mx = part + g * (D + 2) + D, *sum = mx + 1;
            const __m512 ninf = _mm512_set1_ps(-__builtin_inff()); /* past nb: exp gives 0 */
            __m512 s0 = _mm512_mask_loadu_ps(ninf, tail(nb), p[g]);
            __m512 s1 = _mm512_mask_loadu_ps(ninf, tail(nb - 16), p[g] + 16);
            float m = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
            m = m > *mx ? m : *mx;
            alpha[g] = exp1(*mx - m);
            s0 = exp16(_mm512_sub_ps(s0, _mm512_set1_ps(m))), s1 = exp16(_mm512_sub_ps(s1, _mm512_set1_ps(m)));
            _mm512_storeu_ps(p[g], s0), _mm512_storeu_ps(p[g] + 16, s1);
            *sum = *sum * alpha[g] + _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
            *mx = m;
        }
        for (int g = 0; g < G; g++) { /* o = alpha o + p v */
            float *o = part + g * (D + 2);
            __m512 acc[MAXD / 16];
            for (int j = 0; j < nc; j++)
                acc[j] = _mm512_mul_ps(loadf(o + 16 * j, tail(D - 16 * j)), _mm512_set1_ps(alpha[g]));
            for (int i = 0; i < nb; i++) {
                const __m512 pi = _mm512_set1_ps(p[g][i]);
                for (int j = 0; j < nc; j++) acc[j] = _mm512_fmadd_ps(pi, _mm512_loadu_ps(vf[i] + 16 * j), acc[j]);
            }
            for (int j = 0; j < nc; j++) _mm512_mask_storeu_ps(o + 16 * j, tail(D - 16 * j), acc[j]);
        }
    }
}

static void attend_part_128(const float *q, const bf16 *kc, const bf16 *vc, const int64_t *slots, int64_t c0,
                            int64_t c1, int64_t Hkv, int64_t h, int G, float *part) {
    attend_part(q, kc, vc, slots, c0, c1, Hkv, h, G, 128, part);
}

static void attend_part_any(const float *q, const bf16 *kc, const bf16 *vc, const int64_t *slots, int64_t c0,
                            int64_t c1, int64_t Hkv, int64_t h, int G, int64_t D, float *part) {
    attend_part(q, kc, vc, slots, c0, c1, Hkv, h, G, D, part);
}

/* One query head's output [D] from its S partial softmaxes (part [D + 2], psize floats apart):
 * sum_s e^(max_s - M) o_s / sum_s e^(max_s - M) sum_s, with M the largest max. */
static void merge(const float *part, int64_t S, int64_t psize, int64_t D, bf16 *out) {
    float M = -__builtin_inff(), den = 0, w[MAXS];
    for (int64_t s = 0; s < S; s++) M = part[s * psize + D] > M ? part[s * psize + D] : M;
    for (int64_t s = 0; s < S; s++) {
        w[s] = exp1(part[s * psize + D] - M);
        den += w[s] * part[s * psize + D + 1];
    }
    for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail(D - j);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; s++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(w[s]), loadf(part + s * psize + j, m), acc);
        store(out + j, _mm512_div_ps(acc, _mm512_set1_ps(den)), m);
    }
}

/* Decode attention, one new token per sequence, reading the paged cache in place (no gather):
 *   q [B, Hq, D] (sequence stride q_stride); k_cache, v_cache [num_slots, Hkv, D];
 *   sequence b attends to the slots ctx_slots[b * ctx_stride + c], c < ctx_lens[b];
 *   query head hq reads kv head hq / G (G = Hq / Hkv); scale 1 / sqrt(D); fp32 scores and softmax.
 * The new tokens' k and v [B, Hkv, D] (strides k_stride, v_stride) are first written to the slots
 * new_slots[b] (KVCache.write's job). out [B, Hq, D].
 * Work: one unit per (sequence, kv head, split): S splits of each context when the B * Hkv units are
 * fewer than the threads (flash decoding), then a second loop merges the S partial softmaxes of
 * each query head (with S = 1 each unit finishes its own heads). Returns -1 when out of memory. */
int paged_decode(const bf16 *q, int64_t q_stride, const bf16 *k, int64_t k_stride, const bf16 *v, int64_t v_stride,
                 bf16 *k_cache, bf16 *v_cache, const int64_t *new_slots, const int64_t *ctx_slots, int64_t ctx_stride,
                 const int64_t *ctx_lens, bf16 *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int nthreads) {
    const int G = (int)(Hq / Hkv);
    for (int64_t b = 0; b < B; b++) {
        memcpy(k_cache + new_slots[b] * Hkv * D, k + b * k_stride, sizeof(bf16) * Hkv * D);
        memcpy(v_cache + new_slots[b] * Hkv * D, v + b * v_stride, sizeof(bf16) * Hkv * D);
    }
    int64_t L = 0, S = 1;
    for (int64_t b = 0; b < B; b++) L = ctx_lens[b] > L ? ctx_lens[b] : L;
    if (B * Hkv < nthreads) { /* split, keeping at least 128 keys per split */
        S = (nthreads + B * Hkv - 1) / (B * Hkv);
        S = S < (L + 127) / 128 ? S : (L + 127) / 128;
        S = S < MAXS ? S : MAXS;
    }
    const int64_t units = B * Hkv * S, psize = G * (D + 2);
    float *parts = malloc(sizeof(float) * units * psize);
    if (!parts) return -1;
    const __m512 vscale = _mm512_div_ps(_mm512_set1_ps(1), _mm512_sqrt_ps(_mm512_set1_ps((float)D)));
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t b = u / (Hkv * S), h = u / S % Hkv, s = u % S, len = ctx_lens[b];
        const int64_t chunk = (len + S - 1) / S, c0 = s * chunk < len ? s * chunk : len;
        const int64_t c1 = c0 + chunk < len ? c0 + chunk : len;
        float qf[MAXG * MAXD];
        for (int64_t j = 0; j < G * D; j += 16) {
            const __mmask16 m = tail(G * D - j);
            _mm512_mask_storeu_ps(qf + j, m, _mm512_mul_ps(load(q + b * q_stride + h * G * D + j, m), vscale));
        }
        const int64_t *slots = ctx_slots + b * ctx_stride;
        if (D == 128)
            attend_part_128(qf, k_cache, v_cache, slots, c0, c1, Hkv, h, G, parts + u * psize);
        else
            attend_part_any(qf, k_cache, v_cache, slots, c0, c1, Hkv, h, G, D, parts + u * psize);
        for (int g = 0; S == 1 && g < G; g++) /* unsplit: this unit's heads are done */
            merge(parts + u * psize + g * (D + 2), 1, psize, D, out + ((b * Hkv + h) * G + g) * D);
    }
    if (S > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t bh = 0; bh < B * Hq; bh++) {
            const int64_t b = bh / Hq, h = bh % Hq / G, g = bh % G;
            merge(parts + (b * Hkv + h) * S * psize + g * (D + 2), S, psize, D, out + bh * D);
        }
    }
    free(parts);
    return 0;
}

#else /* no AVX-512 at compile time (-march=native): the loader reads this and keeps the torch code */
int layer_ops_supported(void) { return 0; }
void rms_norm(void) {}
void rotary(void) {}
void silu_mul(void) {}
int paged_decode(void) { return -1; }
#endif
