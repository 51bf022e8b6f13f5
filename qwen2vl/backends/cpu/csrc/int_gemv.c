/* int8 / int4 weights times activations quantized on the fly, dot products in AVX-512 VNNI.
 *
 * llama.cpp's recipe: each call quantizes its activations x [M, K] to int8 per row and per block
 * of QK = 32 values along k, so the dot products run as u8 x s8 -> s32
 * `vpdpbusd` (64 multiply-adds per instruction) instead of converting every weight to float.
 * Weights are unsigned codes, so the code's offset is taken out per block, in integer. Per block b
 * of a row of x: d_b = max|x| / 127, xq = round(x / d_b), qsum_b = sum xq, xsum_b = sum x, and
 * dot_b[n] = sum code[n, k] * xq[k] (the vpdpbusd part). Three weight kinds (kernels.h's enum):
 *
 *   INT8, code = q + 128, scale sw per row:
 *       y[n] = sw[n] * (sum_b d_b * dot_b[n] - c),  c = 128 * sum_b d_b * qsum_b
 *   (the code's offset summed once per activation row, not taken out of every block's dot)
 *   INT4 (o = 8) and INT8G (o = 128), code = q + o, w = q * s + z per group g (of 32..256 k, so a
 *   group holds whole blocks):
 *       y[n] = sum_b s_g[n] * d_b * (dot_b[n] - o * qsum_b) + z_g[n] * xsum_b
 *
 * (the zero point meets the exact float sum of x, so it adds no activation error; GPTQ's
 * w = (code - zero) * s is z = (o - zero) * s, exact in float32 for fp16 scales).
 *
 * Weight layouts, in blocks of 16 output rows so each 32-bit lane of a 512-bit register
 * accumulates one row (N padded to 16 with zero rows by the caller):
 *   INT8, INT8G: [N/16][K/4][16][4] bytes, the codes; one 64-byte load = 16 rows x 4 k.
 *   INT4: [N/16][K/8][16][4] bytes, low nibble k = 8c + j, high nibble k = 8c + 4 + j; one
 *         64-byte load gives two dpbusd operands after an and / a shift.
 *   INT4, INT8G scales and zeros: [N/16][K/group][2][16] (16 scales, then 16 zeros).
 * x, y and bias are bf16 or fp32 (io_bf16); scales bf16 or fp32 (scales_bf16). K % 32 == 0.
 * Returns 0, or -1 when out of memory. Built by qwen2vl/backends/cpu/native.py.
 */
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>
#include "int_gemv_acts.h"

#if !(defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
      defined(__AVX512VNNI__))
#error "needs AVX-512 VNNI (native.py compiles it with -mavx512f -mavx512bw -mavx512vl -mavx512vnni)"
#endif
#include <immintrin.h>

static inline __m512 load16(const void *p, int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
    return _mm512_loadu_ps(p);
}

static inline __m512 load16_masked(const void *p, int bf16, __mmask16 mask) { /* zeros where mask is 0 */
    if (!bf16) return _mm512_maskz_loadu_ps(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline void store16(void *p, __m512 v, int bf16, __mmask16 mask) {
    if (!bf16) {
        _mm512_mask_storeu_ps(p, mask, v);
        return;
    }
    /* round to nearest even, as torch does (NaN payloads aside) */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

static inline __m512i bcast4(const int8_t *p) { /* 4 activation bytes to every lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static void quantize_row(const char *x, int bf16, int64_t M, int64_t K, Acts a, int64_t m) {
    const int64_t nb = K / QK, esz = bf16 ? 2 : 4, m0 = m / MR * MR;
    const int mr = chunk_rows(M, m0), r = (int)(m - m0);
    float offset = 0;
    for (int64_t b = 0; b < nb; b++) {
        __m512 v0 = load16(x + b * QK * esz, bf16), v1 = load16(x + (b * QK + 16) * esz, bf16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id))); /* nearest even */
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        int8_t q[QK];
        _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
        for (int j = 0; j < QK / 4; j++) memcpy(a.q + m0 * K + ((b * QK / 4 + j) * mr + r) * 4, q + 4 * j, 4);
        const int32_t sq = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        a.blk[m0 * nb + b * mr + r] = (Block){d, _mm512_reduce_add_ps(_mm512_add_ps(v0, v1)), sq};
        offset += d * (float)(128 * sq);
    }
    a.offset[m] = offset;
}

/* The codes' dots of block b (32 k) of one 16-row weight block with activation rows m0 .. m0 + mr:
 * dot[r] lane i = sum_k code[i, k] * xq[m0 + r, k], < 2^21 (exact in float). mr is a constant after
 * inlining, so the arrays live in registers. */
static inline __attribute__((always_inline)) void int8_dots(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            int64_t b, const int mr, __m512i *dot) {
    __m512i s0[MR], s1[MR];
    for (int r = 0; r < mr; r++) s0[r] = s1[r] = _mm512_setzero_si512();
    for (int c = 0; c < QK / 4; c += 2) {
        const uint8_t *wc = w + (b * QK / 4 + c) * 64;
        prefetch(wc + PREFETCH, a.once), prefetch(wc + 64 + PREFETCH, a.once);
        __m512i w0 = _mm512_loadu_si512(wc), w1 = _mm512_loadu_si512(wc + 64);
        for (int r = 0; r < mr; r++) {
            const int8_t *xr = a.q + m0 * K + ((b * QK / 4 + c) * mr + r) * 4;
            s0[r] = _mm512_dpbusd_epi32(s0[r], w0, bcast4(xr));
            s1[r] = _mm512_dpbusd_epi32(s1[r], w1, bcast4(xr + 4 * mr));
        }
    }
    for (int r = 0; r < mr; r++) dot[r] = _mm512_add_epi32(s0[r], s1[r]);
}

static inline __attribute__((always_inline)) void int4_dots(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            int64_t b, const int mr, __m512i *dot) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512i s0[MR], s1[MR];
    for (int r = 0; r < mr; r++) s0[r] = s1[r] = _mm512_setzero_si512();
    for (int c = 0; c < QK / 8; c++) {
        prefetch(w + (b * QK / 8 + c) * 64 + PREFETCH, a.once);
        __m512i v = _mm512_loadu_si512(w + (b * QK / 8 + c) * 64);
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < mr; r++) {
            const int8_t *xr = a.q + m0 * K + ((b * QK / 4 + 2 * c) * mr + r) * 4;
            s0[r] = _mm512_dpbusd_epi32(s0[r], lo, bcast4(xr));
            s1[r] = _mm512_dpbusd_epi32(s1[r], hi, bcast4(xr + 4 * mr));
        }
    }
    for (int r = 0; r < mr; r++) dot[r] = _mm512_add_epi32(s0[r], s1[r]);
}

/* INT8: acc[r] gets 16 outputs of row m0 + r before the codes' offset and the per-row scale. */
static inline __attribute__((always_inline)) void int8_tile(const uint8_t *w, int64_t K, Acts a, int64_t m0,
                                                            const int mr, __m512 *acc) {
    const int64_t nb = K / QK;
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i dot[MR];
        int8_dots(w, K, a, m0, b, mr, dot);
        for (int r = 0; r < mr; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(a.blk[m0 * nb + b * mr + r].d), acc[r]);
    }
}

/* INT4 (bits 4) and INT8G (bits 8): acc[r] gets 16 outputs of row m0 + r, scales and zeros per group. */
static inline __attribute__((always_inline)) void group_tile(const int bits, const uint8_t *w, const char *sz,
                                                             int sz_bf16, int64_t K, int64_t group, Acts a,
                                                             int64_t m0, const int mr, __m512 *acc) {
    const int64_t nb = K / QK, esz = sz_bf16 ? 2 : 4;
    const int gshift = __builtin_ctzll(group / QK); /* block b is in group b >> gshift */
    const int32_t offset = 1 << (bits - 1);         /* the code of q = 0 */
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i dot[MR];
        if (bits == 8)
            int8_dots(w, K, a, m0, b, mr, dot);
        else
            int4_dots(w, K, a, m0, b, mr, dot);
        const char *sg = sz + (b >> gshift) * 32 * esz;
        prefetch(sg + PREFETCH / 2, a.once); /* scales stream at 1/4 (int4 g32) or less of the weights' rate */
        __m512 scale = load16(sg, sz_bf16), zero = load16(sg + 16 * esz, sz_bf16);
        for (int r = 0; r < mr; r++) {
            const Block k = a.blk[m0 * nb + b * mr + r];
            __m512i q = _mm512_sub_epi32(dot[r], _mm512_set1_epi32(offset * k.sq)); /* q . xq */
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(k.d));
            acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(k.s), _mm512_fmadd_ps(scale, t, acc[r]));
        }
    }
}

/* One kind's tile: acc[r] = row m0 + r's 16 outputs before the per-row scale (INT8's, 1 for the
 * others) and the bias. The kind is tested once per 16-row block and rows; bits and mr are constants
 * in what it calls. */
static inline __attribute__((always_inline)) void tile(int kind, const uint8_t *w, const char *sz,
                                                       int sz_bf16, int64_t K, int64_t group, Acts a, int64_t m0,
                                                       const int mr, __m512 *acc) {
    if (kind == INT8) {
        int8_tile(w, K, a, m0, mr, acc);
        for (int r = 0; r < mr; r++) acc[r] = _mm512_sub_ps(acc[r], _mm512_set1_ps(a.offset[m0 + r]));
    } else if (kind == INT8G) {
        group_tile(8, w, sz, sz_bf16, K, group, a, m0, mr, acc);
    } else {
        group_tile(4, w, sz, sz_bf16, K, group, a, m0, mr, acc);
    }
}

static inline __attribute__((always_inline)) void tiles(int kind, const uint8_t *w, const char *sz,
                                                        int sz_bf16, int64_t K, int64_t group, Acts a, int64_t m0,
                                                        int mr, __m512 *acc) {
    switch (mr) {
        case 1: tile(kind, w, sz, sz_bf16, K, group, a, m0, 1, acc); break;
        case 2: tile(kind, w, sz, sz_bf16, K, group, a, m0, 2, acc); break;
        case 3: tile(kind, w, sz, sz_bf16, K, group, a, m0, 3, acc); break;
        default: tile(kind, w, sz, sz_bf16, K, group, a, m0, MR, acc);
    }
}

/* Shared driver: quantize x, then each thread takes whole 16-row weight blocks. */
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
                __mmask16 mask = N - n0 >= 16 ? 0xffff : (__mmask16)((1u << (N - n0)) - 1);
                __m512 rowscale = kind == INT8 ? load16((const char *)scales + n0 * sesz, scales_bf16) : _mm512_set1_ps(1);
                __m512 b = bias ? load16_masked((const char *)bias + n0 * esz, io_bf16, mask) : _mm512_setzero_ps();
                const uint8_t *wb = w + n0 * K / (kind == INT4 ? 2 : 1);
                const char *sb = (const char *)scales + (kind == INT8 ? 0 : n0 * (K / group) * 2 * sesz);
                for (int64_t m0 = 0; m0 < M; m0 += MR) {
                    __m512 acc[MR];
                    const int mr = chunk_rows(M, m0);
                    tiles(kind, wb, sb, scales_bf16, K, group, a, m0, mr, acc);
                    for (int r = 0; r < mr; r++)
                        store16((char *)y + ((m0 + r) * N + n0) * esz, _mm512_fmadd_ps(acc[r], rowscale, b), io_bf16,
                                mask);
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
