/* Decode attention over the paged KV cache, one C call for a decode step's layer: writes the new
 * tokens' k and v into their cache slots, then attends each query head over its sequence's slots
 * in place (no gather), with flash-decoding splits of long contexts when there are fewer
 * (sequence, kv head) units than threads. fp32 scores and softmax, as torch's decode path; equal
 * to it within a bf16 rounding (another summation order). Split from layer_ops.c, whose calls
 * surround it in a layer; built by qwen2vl/kernels/layer_ops.py. */
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>


#define KB 32   /* keys per block of the attention's online softmax */
#define MAXG 16 /* query heads per kv head, at most (checked by the caller) */
#define MAXD 256 /* head dim, at most (checked by the caller) */
#define MAXS 64 /* context splits of one (sequence, kv head), at most */

#include "bf16_simd.h" /* f32x16 and its operations, for AVX-512 or AVX2 */


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
            f32x16 kr[MAXD / 16];
            for (int j = 0; j < nc; j++) {
                kr[j] = load(k + 16 * j, tail(D - 16 * j));
                storef(vf[i] + 16 * j, load(v + 16 * j, tail(D - 16 * j)), FULL);
            }
            for (int g = 0; g < G; g++) {
                f32x16 acc = vzero();
                for (int j = 0; j < nc; j++) acc = vfma(loadf(q + g * D + 16 * j, tail(D - 16 * j)), kr[j], acc);
                p[g][i] = hsum(acc);
            }
        }
        for (int g = 0; g < G; g++) { /* p = exp(score - new max); alpha rescales what came before */
            float *mx = part + g * (D + 2) + D, *sum = mx + 1;
            const f32x16 ninf = vset(-__builtin_inff()); /* past nb: exp gives 0 */
            f32x16 s0 = vsel(tail(nb), loadf(p[g], tail(nb)), ninf);
            f32x16 s1 = vsel(tail(nb - 16), loadf(p[g] + 16, tail(nb - 16)), ninf);
            float m = hmax(vmax(s0, s1));
            m = m > *mx ? m : *mx;
            alpha[g] = exp1(*mx - m);
            s0 = exp16(vsub(s0, vset(m))), s1 = exp16(vsub(s1, vset(m)));
            storef(p[g], s0, FULL), storef(p[g] + 16, s1, FULL);
            *sum = __builtin_fmaf(*sum, alpha[g], hsum(vadd(s0, s1)));
            *mx = m;
        }
        for (int g = 0; g < G; g++) { /* o = alpha o + p v */
            float *o = part + g * (D + 2);
            f32x16 acc[MAXD / 16];
            for (int j = 0; j < nc; j++) acc[j] = vmul(loadf(o + 16 * j, tail(D - 16 * j)), vset(alpha[g]));
            for (int i = 0; i < nb; i++) {
                const f32x16 pi = vset(p[g][i]);
                for (int j = 0; j < nc; j++) acc[j] = vfma(pi, loadf(vf[i] + 16 * j, FULL), acc[j]);
            }
            for (int j = 0; j < nc; j++) storef(o + 16 * j, acc[j], tail(D - 16 * j));
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
        den = __builtin_fmaf(w[s], part[s * psize + D + 1], den);
    }
    for (int64_t j = 0; j < D; j += 16) {
        const mask16 m = tail(D - j);
        f32x16 acc = vzero();
        for (int64_t s = 0; s < S; s++) acc = vfma(vset(w[s]), loadf(part + s * psize + j, m), acc);
        store(out + j, vdiv(acc, vset(den)), m);
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
    const f32x16 vscale = vdiv(vset(1), vsqrt(vset((float)D)));
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const int64_t b = u / (Hkv * S), h = u / S % Hkv, s = u % S, len = ctx_lens[b];
        const int64_t chunk = (len + S - 1) / S, c0 = s * chunk < len ? s * chunk : len;
        const int64_t c1 = c0 + chunk < len ? c0 + chunk : len;
        float qf[MAXG * MAXD];
        for (int64_t j = 0; j < G * D; j += 16) {
            const mask16 m = tail(G * D - j);
            storef(qf + j, vmul(load(q + b * q_stride + h * G * D + j, m), vscale), m);
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

