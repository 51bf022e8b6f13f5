/* int_gemv.c's int8 / int4 / grouped int8 kernels for CPUs without AVX-512 (AVX2 + FMA + F16C: Zen 2/3, Intel
 * client CPUs since Haswell): the same exported functions, weight layouts, activation
 * quantization and formulas (read int_gemv.c's header), so quant.py and the decode step use either.
 *
 * AVX2 has no vpdpbusd; llama.cpp's Q8_0/Q4_0 recipe stands in: `vpmaddubsw` (u8 x s8, adjacent
 * pairs summed to s16) then `vpmaddwd` with ones (pairs to s32), which gives a 32-bit lane the
 * same 4-k dot product vpdpbusd adds. vpmaddubsw saturates at s16, so each operand pair is kept
 * in range:
 *   int8 (INT8, INT8G): the code (0..255) times xq would reach 2 * 255 * 127. The weight's signed
 *         value q = code ^ 0x80 goes in as |q| (unsigned, <= 128) and xq takes q's sign (vpsignb,
 *         which zeroes where q is 0): products <= 128 * 127, pair sums <= 32512. The code's dot
 *         follows exactly, dot = (q . xq) + 128 * qsum, in integer.
 *   int4: codes 0..15 times xq: pair sums <= 3810, so a 32-k block's 8 vpmaddubsw results add up
 *         in s16 (<= 30480) before one vpmaddwd.
 * The integer dots equal VNNI's, and every float step (quantizing x, the block sums, the
 * accumulation over blocks, the offset, scale and bias) is int_gemv.c's, in its order, so the
 * outputs equal the AVX-512 kernel's bit for bit (tests/test_quant.py checks it where both run).
 * One 32-byte load holds 8 weight rows x 4 k: a 16-row block is two registers, rows 0-7 and 8-15.
 */
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>
#include "int_gemv_acts.h"

#if !(defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__))
#error "needs AVX2 and FMA (native.py compiles it with -mavx2 -mfma -mf16c)"
#endif
#include <immintrin.h>
#include "avx2_io.h"

/* As int_gemv.c: 8 KB ahead, non-temporal when each weight block is read in one pass. */

static inline __m256i bcast4(const int8_t *p) { /* 4 activation bytes to every lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int_gemv.c's quantize_row step for step: the same scale, rounding and sums, the float sum in
 * _mm512_reduce_add_ps's order (halves of the 32 values' pairwise sums, then 128-bit halves). */
static void quantize_row(const char *x, int bf16, int64_t M, int64_t K, Acts a, int64_t m) {
    const int64_t nb = K / QK, esz = bf16 ? 2 : 4, m0 = m / MR * MR;
    const int mr = chunk_rows(M, m0), r = (int)(m - m0);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    float offset = 0;
    for (int64_t b = 0; b < nb; b++) {
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = avx2_load8(x + (b * QK + 8 * i) * esz, bf16);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        /* |q| <= 127: the saturating packs are exact; they interleave 4-byte groups per 128-bit lane */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        int8_t qb[QK];
        _mm256_storeu_si256((__m256i *)qb, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        for (int j = 0; j < QK / 4; j++) memcpy(a.q + m0 * K + ((b * QK / 4 + j) * mr + r) * 4, qb + 4 * j, 4);
        __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
        q4 = _mm_add_epi32(q4, _mm_shuffle_epi32(q4, 0x4e));
        const int32_t sq = _mm_cvtsi128_si32(_mm_add_epi32(q4, _mm_shuffle_epi32(q4, 0xb1)));
        __m256 t3 = _mm256_add_ps(_mm256_add_ps(v[1], v[3]), _mm256_add_ps(v[0], v[2]));
        __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, 0x4e));
        const float s = _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, 0x01)));
        a.blk[m0 * nb + b * mr + r] = (Block){d, s, sq};
        offset += d * (float)(128 * sq);
    }
    a.offset[m] = offset;
}

/* The codes' dots of block b (32 k) of one 16-row weight block with activation rows m0 .. m0 + mr, the
 * integers int_gemv.c's vpdpbusd gives: dot[2r], dot[2r + 1] rows 0-7 and 8-15 for activation row m0 + r. */
static inline __attribute__((always_inline)) void int8_dots(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            int64_t b, const int mr, __m256i *dot) {
    const int64_t nb = K / QK;
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256i s[2 * MR];
    for (int i = 0; i < 2 * mr; i++) s[i] = _mm256_setzero_si256();
    for (int c = 0; c < QK / 4; c++) {
        const uint8_t *wc = w + (b * QK / 4 + c) * 64;
        prefetch(wc + PREFETCH, a.once);
        __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wc), flip);
        __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wc + 32)), flip);
        __m256i u0 = _mm256_abs_epi8(q0), u1 = _mm256_abs_epi8(q1);
        for (int r = 0; r < mr; r++) {
            __m256i xb = bcast4(a.q + m0 * K + ((b * QK / 4 + c) * mr + r) * 4);
            __m256i p0 = _mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, q0));
            __m256i p1 = _mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, q1));
            s[2 * r] = _mm256_add_epi32(s[2 * r], _mm256_madd_epi16(p0, ones));
            s[2 * r + 1] = _mm256_add_epi32(s[2 * r + 1], _mm256_madd_epi16(p1, ones));
        }
    }
    for (int r = 0; r < mr; r++) {
        const __m256i off = _mm256_set1_epi32(128 * a.blk[m0 * nb + b * mr + r].sq); /* q . xq -> the codes' dot */
        dot[2 * r] = _mm256_add_epi32(s[2 * r], off), dot[2 * r + 1] = _mm256_add_epi32(s[2 * r + 1], off);
    }
}

static inline __attribute__((always_inline)) void int4_dots(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            int64_t b, const int mr, __m256i *dot) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256i s[2 * MR]; /* s16 sums of the block's 8 products per lane pair: <= 8 * 3810 */
    for (int i = 0; i < 2 * mr; i++) s[i] = _mm256_setzero_si256();
    for (int c = 0; c < QK / 8; c++) {
        const uint8_t *wc = w + (b * QK / 8 + c) * 64;
        prefetch(wc + PREFETCH, a.once);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)wc), v1 = _mm256_loadu_si256((const __m256i *)(wc + 32));
        __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
        __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
        for (int r = 0; r < mr; r++) {
            const int8_t *xr = a.q + m0 * K + ((b * QK / 4 + 2 * c) * mr + r) * 4;
            __m256i xl = bcast4(xr), xh = bcast4(xr + 4 * mr);
            s[2 * r] = _mm256_add_epi16(s[2 * r], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl),
                                                                   _mm256_maddubs_epi16(hi0, xh)));
            s[2 * r + 1] = _mm256_add_epi16(s[2 * r + 1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl),
                                                                           _mm256_maddubs_epi16(hi1, xh)));
        }
    }
    for (int i = 0; i < 2 * mr; i++) dot[i] = _mm256_madd_epi16(s[i], ones);
}

/* INT8: acc[2r], acc[2r + 1] get rows 0-7 and 8-15 of row m0 + r's outputs before the codes' offset
 * and the per-row scale. */
static inline __attribute__((always_inline)) void int8_tile(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            const int mr, __m256 *acc) {
    const int64_t nb = K / QK;
    for (int i = 0; i < 2 * mr; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i dot[2 * MR];
        int8_dots(w, K, a, m0, b, mr, dot);
        for (int r = 0; r < mr; r++) {
            const __m256 d = _mm256_set1_ps(a.blk[m0 * nb + b * mr + r].d);
            for (int h = 0; h < 2; h++)
                acc[2 * r + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[2 * r + h]), d, acc[2 * r + h]);
        }
    }
}

/* INT4 (bits 4) and INT8G (bits 8): scales and zeros per group, int_gemv.c's float steps. */
static inline __attribute__((always_inline)) void group_tile(const int bits, const uint8_t *w, const char *sz,
                                                             int sz_bf16, int64_t K, int64_t group, Acts a,
                                                             int64_t m0, const int mr, __m256 *acc) {
    const int64_t nb = K / QK, esz = sz_bf16 ? 2 : 4;
    const int gshift = __builtin_ctzll(group / QK); /* block b is in group b >> gshift */
    const int32_t offset = 1 << (bits - 1);         /* the code of q = 0 */
    for (int i = 0; i < 2 * mr; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i dot[2 * MR];
        if (bits == 8)
            int8_dots(w, K, a, m0, b, mr, dot);
        else
            int4_dots(w, K, a, m0, b, mr, dot);
        const char *sg = sz + (b >> gshift) * 32 * esz;
        prefetch(sg + PREFETCH / 2, a.once);
        __m256 scale[2], zero[2];
        avx2_load16(sg, sz_bf16, 16, scale), avx2_load16(sg + 16 * esz, sz_bf16, 16, zero);
        for (int r = 0; r < mr; r++) {
            const Block k = a.blk[m0 * nb + b * mr + r];
            for (int h = 0; h < 2; h++) {
                __m256i q = _mm256_sub_epi32(dot[2 * r + h], _mm256_set1_epi32(offset * k.sq)); /* q . xq */
                __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(k.d));
                acc[2 * r + h] = _mm256_fmadd_ps(zero[h], _mm256_set1_ps(k.s),
                                                 _mm256_fmadd_ps(scale[h], t, acc[2 * r + h]));
            }
        }
    }
}

/* As int_gemv.c's: one kind's tile, before the per-row scale (INT8's) and the bias. */
static inline __attribute__((always_inline)) void tile(int kind, const uint8_t *w, const char *sz,
                                                       int sz_bf16, int64_t K, int64_t group, Acts a, int64_t m0,
                                                       const int mr, __m256 *acc) {
    if (kind == INT8) {
        int8_tile(w, K, a, m0, mr, acc);
        for (int i = 0; i < 2 * mr; i++) acc[i] = _mm256_sub_ps(acc[i], _mm256_set1_ps(a.offset[m0 + i / 2]));
    } else if (kind == INT8G) {
        group_tile(8, w, sz, sz_bf16, K, group, a, m0, mr, acc);
    } else {
        group_tile(4, w, sz, sz_bf16, K, group, a, m0, mr, acc);
    }
}

static inline __attribute__((always_inline)) void tiles(int kind, const uint8_t *w, const char *sz,
                                                        int sz_bf16, int64_t K, int64_t group, Acts a, int64_t m0,
                                                        int mr, __m256 *acc) {
    switch (mr) {
        case 1: tile(kind, w, sz, sz_bf16, K, group, a, m0, 1, acc); break;
        case 2: tile(kind, w, sz, sz_bf16, K, group, a, m0, 2, acc); break;
        case 3: tile(kind, w, sz, sz_bf16, K, group, a, m0, 3, acc); break;
        default: tile(kind, w, sz, sz_bf16, K, group, a, m0, MR, acc);
    }
}

/* int_gemv.c's driver: quantize x, then each thread takes whole 16-row weight blocks. */
static int gemm(int kind, const uint8_t *w, const void *scales, int scales_bf16, const void *x, void *y,
                const void *bias, int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads) {
    const int64_t nb = K / QK, esz = io_bf16 ? 2 : 4, sesz = scales_bf16 ? 2 : 4;
    Acts a = {malloc(M * K), malloc(M * nb * sizeof(Block)), malloc(M * sizeof(float)), M <= MR};
    int ok = a.q && a.blk && a.offset;
    if (ok) {
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) quantize_row((const char *)x + m * K * esz, io_bf16, M, K, a, m);
#pragma omp for schedule(static)
            for (int64_t n0 = 0; n0 < N; n0 += 16) {
                const int n = N - n0 < 16 ? (int)(N - n0) : 16;
                __m256 rowscale[2] = {_mm256_set1_ps(1), _mm256_set1_ps(1)}, b[2] = {_mm256_setzero_ps(),
                                                                                   _mm256_setzero_ps()};
                if (kind == INT8) avx2_load16((const char *)scales + n0 * sesz, scales_bf16, 16, rowscale);
                if (bias) avx2_load16((const char *)bias + n0 * esz, io_bf16, n, b);
                const uint8_t *wb = w + n0 * K / (kind == INT4 ? 2 : 1);
                const char *sb = (const char *)scales + (kind == INT8 ? 0 : n0 * (K / group) * 2 * sesz);
                for (int64_t m0 = 0; m0 < M; m0 += MR) {
                    __m256 acc[2 * MR];
                    const int mr = chunk_rows(M, m0);
                    tiles(kind, wb, sb, scales_bf16, K, group, a, m0, mr, acc);
                    for (int r = 0; r < mr; r++) {
                        __m256 out[2];
                        for (int h = 0; h < 2; h++) out[h] = _mm256_fmadd_ps(acc[2 * r + h], rowscale[h], b[h]);
                        avx2_store16((char *)y + ((m0 + r) * N + n0) * esz, out, io_bf16, n);
                    }
                }
            }
        }
    }
    free(a.q), free(a.blk), free(a.offset);
    return ok ? 0 : -1;
}

int int8_gemm(const uint8_t *w, const void *scales, int scales_bf16, const void *x, void *y, const void *bias,
              int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    return gemm(INT8, w, scales, scales_bf16, x, y, bias, io_bf16, M, N, K, QK, nthreads);
}

int int4_gemm(const uint8_t *w, const void *scales_zeros, int scales_bf16, const void *x, void *y, const void *bias,
              int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads) {
    return gemm(INT4, w, scales_zeros, scales_bf16, x, y, bias, io_bf16, M, N, K, group, nthreads);
}

int int8g_gemm(const uint8_t *w, const void *scales_zeros, int scales_bf16, const void *x, void *y, const void *bias,
               int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads) {
    return gemm(INT8G, w, scales_zeros, scales_bf16, x, y, bias, io_bf16, M, N, K, group, nthreads);
}
