/* int8 weights times int8 activations for many rows (prefill, the vision tower): W8A8 with one
 * activation scale per row (token), the integer dot products exact over the whole of k.
 *
 * Per row m of x: d_m = max|x_m| / 127, xq = round(x_m / d_m) (nearest even) in [-127, 127]; per
 * output channel n: the weight codes of pack_int8 (code = q + 128, q in [-127, 127], scale sw_n):
 *
 *   y[m, n] = ((float)dot[m, n] * d_m) * sw_n + bias[n],  dot = sum_k q[n, k] * xq[m, k] (int32)
 *
 * three float32 roundings in that order (compiled with -ffp-contract=off: none of them fused), then
 * bf16's rounding for a bf16 y. The dot is exact integer arithmetic (|dot| <= 127 * 127 * K: K up to
 * 65536 by the caller's check), so a row's output depends on nothing but its own x: not on the
 * rows beside it, the tile, the thread count nor the tier. The AVX2 and the AVX-512 VNNI builds
 * give the same bits.
 *
 * int_gemv.c / int_gemv_avx2.c (decode) quantize per block of 32 k, which needs a float step per
 * block in the inner loop; one scale per row leaves the loop integer only:
 *   AVX2: llama.cpp's sign trick: vpmaddubsw(|q|, sign(xq, q)) multiplies u8 by s8 into pairs of
 *     s16 that can't saturate (both in [-127, 127]: a pair <= 32258), vpmaddwd by ones widens them
 *     into the int32 sums; 32 products in 4 instructions. Register tile MT rows x one 16-row block.
 *   AVX-512 VNNI: vpdpbusd(code, xq) sums 4 u8 x s8 products into each int32 lane, 64 products in
 *     one instruction; the codes' offset comes out once per row: dot = dot(code) - 128 * sum xq.
 *     Register tile 8 rows x one block. (8 x 3 blocks ran at half the rate: the blocks' streams lie
 *     16 * K bytes apart, a multiple of 4 KiB for K % 256 == 0, and alias in L1.)
 * Each thread takes an equal share of the blocks, in groups (about GROUP_BYTES of weights, kept
 * in L2); every row tile walks the group, the first one bringing it from memory.
 * Weights: pack_int8's [N/16][K/4][16][4] codes, scales sw [N padded to 16] bf16 or fp32. x, y,
 * bias bf16 or fp32 (io_bf16). K % 4 == 0. Returns 0, or -1 when out of memory.
 */
#include <omp.h>
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>

#if !(defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__))
#error "needs AVX2 (native.py compiles it with -mavx2 -mfma -mf16c)"
#endif
#include <immintrin.h>
#include "avx2_io.h"

#define GROUP_BYTES (256 << 10)
#define PF 4096

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
typedef __m512i ivec;
#define H 1  /* registers per 16-row block */
#define MT 8 /* register tile: MT rows x NT blocks */
#define NT 1 /* 3: half the rate (see above) */
#else
#define VNNI 0
typedef __m256i ivec;
#define H 2
#define MT 4
#define NT 1
#endif

/* Blocks w.. (nb of them, each 16 * K bytes apart) times quantized rows x.. (mr of them): the
 * int32 sums acc[(r * nb + j) * H + h]. mr and nb are constants after inlining. */
static inline __attribute__((always_inline)) void tile(const uint8_t *w, const int8_t *x, int64_t K, const int mr,
                                                       const int nb, const int pf, ivec *out) {
    const int64_t bstride = 16 * K;
    ivec acc[MT * NT * H]; /* local, copied out at the end: gcc keeps it in registers (not `out`) */
    for (int i = 0; i < mr * nb * H; i++) acc[i] = (ivec){0};
#if VNNI
    for (int64_t c = 0; c < K / 4; c++) {
        ivec wv[NT];
        for (int j = 0; j < nb; j++) {
            const uint8_t *p = w + j * bstride + c * 64;
            if (pf) __builtin_prefetch(p + PF, 0, 3);
            wv[j] = _mm512_loadu_si512(p);
        }
        for (int r = 0; r < mr; r++) {
            const ivec xb = _mm512_set1_epi32(load4(x + r * K + 4 * c));
            for (int j = 0; j < nb; j++) acc[r * nb + j] = _mm512_dpbusd_epi32(acc[r * nb + j], wv[j], xb);
        }
    }
#else
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    /* one 8-row half of the block at a time: 8 accumulators, the half's weights (signed and
     * absolute), a broadcast, a product and the two constants fit the 16 registers (both halves'
     * weights at once spilled accumulators); the second half broadcasts x again, from memory */
    for (int64_t c = 0; c < K / 4; c++) {
        for (int i = 0; i < 2 * nb; i++) {
            const uint8_t *p = w + (i / 2) * bstride + c * 64 + 32 * (i % 2);
            if (pf && i % 2 == 0) __builtin_prefetch(p + PF, 0, 3);
            const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), flip);
            const __m256i u = _mm256_abs_epi8(q);
            for (int r = 0; r < mr; r++) {
                const int8_t *xp = x + r * K + 4 * c;
                __asm__ volatile("" : "+r"(xp)); /* or gcc keeps the first half's broadcasts in registers */
                const __m256i xb = _mm256_set1_epi32(load4(xp));
                const __m256i prod = _mm256_maddubs_epi16(u, _mm256_sign_epi8(xb, q));
                acc[r * 2 * nb + i] = _mm256_add_epi32(acc[r * 2 * nb + i], _mm256_madd_epi16(prod, ones));
            }
        }
    }
#endif
    for (int i = 0; i < mr * nb * H; i++) out[i] = acc[i];
}

typedef struct {
    int8_t *q;      /* [M, K] quantized rows */
    float *d;       /* [M] row scales */
    int32_t *qsum;  /* [M] sum of each row's q (VNNI: the codes' offset) */
} Rows;

/* Row m of x quantized: the scale, the codes and their sum. Max, rounding and integer sums don't
 * depend on the order they are taken in, so any vector width gives the same bytes. */
static void quantize_row(const char *x, int bf16, int64_t K, Rows a, int64_t m) {
    const int64_t esz = bf16 ? 2 : 4, k8 = K / 8 * 8;
    const char *xm = x + m * K * esz;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int64_t k = 0; k < k8; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, avx2_load8(xm + k * esz, bf16)));
    float v[8], amax = 0;
    _mm256_storeu_ps(v, mx);
    for (int i = 0; i < 8; i++) amax = v[i] > amax ? v[i] : amax;
    for (int64_t k = k8; k < K; k++) {
        float t = load1(xm, k, bf16);
        t = t < 0 ? -t : t;
        amax = t > amax ? t : amax;
    }
    const float d = amax / 127.0f, id = d > 0 ? 1.0f / d : 0.0f;
    int8_t *q = a.q + m * K;
    __m256i s = _mm256_setzero_si256();
    for (int64_t k = 0; k < k8; k += 8) {
        const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(avx2_load8(xm + k * esz, bf16), _mm256_set1_ps(id)));
        s = _mm256_add_epi32(s, i32);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(i16, i16)); /* |q| <= 127: exact */
    }
    int32_t si[8], sum = 0;
    _mm256_storeu_si256((__m256i *)si, s);
    for (int i = 0; i < 8; i++) sum += si[i];
    for (int64_t k = k8; k < K; k++) {
        float t = load1(xm, k, bf16);
        q[k] = (int8_t)_mm_cvtss_si32(_mm_set_ss(t * id)); /* nearest even, as the vector path */
        sum += q[k];
    }
    a.d[m] = d, a.qsum[m] = sum;
}

/* The sums of rows m0.. (mr) x blocks b0.. (nb) to y: the formula at the top, stored. */
static void store_tile(const ivec *acc, Rows a, const void *scales, int scales_bf16, const void *bias, char *y,
                       int io_bf16, int64_t m0, int mr, int64_t b0, int nb, int64_t N) {
    const int64_t esz = io_bf16 ? 2 : 4, sesz = scales_bf16 ? 2 : 4;
    for (int j = 0; j < nb; j++) {
        const int64_t n0 = (b0 + j) * 16;
        const int n = N - n0 < 16 ? (int)(N - n0) : 16;
        __m256 sw[2], b[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        avx2_load16((const char *)scales + n0 * sesz, scales_bf16, 16, sw);
        if (bias) avx2_load16((const char *)bias + n0 * esz, io_bf16, n, b);
        for (int r = 0; r < mr; r++) {
            __m256i dot[2];
#if VNNI
            const __m512i s = _mm512_sub_epi32(acc[r * nb + j], _mm512_set1_epi32(128 * a.qsum[m0 + r]));
            dot[0] = _mm512_castsi512_si256(s), dot[1] = _mm512_extracti64x4_epi64(s, 1);
#else
            dot[0] = acc[(r * nb + j) * 2], dot[1] = acc[(r * nb + j) * 2 + 1];
#endif
            __m256 out[2];
            for (int h = 0; h < 2; h++) {
                const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[h]), _mm256_set1_ps(a.d[m0 + r]));
                out[h] = _mm256_add_ps(_mm256_mul_ps(t, sw[h]), b[h]);
            }
            avx2_store16(y + ((m0 + r) * N + n0) * esz, out, io_bf16, n);
        }
    }
}

#define TILE(mr, nbc)                                                                                   \
    do {                                                                                                \
        ivec acc[MT * NT * H];                                                                          \
        tile(w + b0 * 16 * K, a.q + m0 * K, K, mr, nbc, m0 == 0, acc);                                  \
        store_tile(acc, a, scales, scales_bf16, bias, (char *)y, io_bf16, m0, mr, b0, nbc, N);         \
    } while (0)

/* rows m0.. (mr) times the blocks b0.. (nb <= NT): NT side by side, or one at a time (same sums) */
static inline __attribute__((always_inline)) void rows_times_blocks(const uint8_t *w, Rows a, const void *scales,
                                                                    int scales_bf16, const void *bias, void *y,
                                                                    int io_bf16, int64_t N, int64_t K, int64_t m0,
                                                                    const int mr, int64_t b0, int nb) {
    if (nb == NT) {
        TILE(mr, NT);
    } else {
        for (const int64_t end = b0 + nb; b0 < end; b0++) TILE(mr, 1);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && VNNI
#include "amx_tiles.h"
#include "int8_amx.h"
#define HAVE_AMX8 1
#else
#define HAVE_AMX8 0
#define amx8_state 0
static void amx8_mm(const uint8_t *w, Rows a, const void *scales, int scales_bf16, const void *bias, void *y,
                    int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    (void)w, (void)a, (void)scales, (void)scales_bf16, (void)bias, (void)y, (void)io_bf16, (void)M, (void)N, (void)K;
    (void)nthreads;
}
int int8_mm_amx(int enable) { /* built without AMX: never on */
    (void)enable;
    return 0;
}
#endif

int int8_mm(const uint8_t *w, const void *scales, int scales_bf16, const void *x, void *y, const void *bias,
            int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int amx = HAVE_AMX8 && amx8_state > 0 && K % 64 == 0;
    const int64_t rows = amx ? (M + 31) / 32 * 32 : M; /* the AMX tiles read rows in groups of 32 */
    Rows a = {malloc(rows * K), malloc(M * sizeof(float)), malloc(M * sizeof(int32_t))};
    const int ok = a.q && a.d && a.qsum;
    const int64_t blocks = (N + 15) / 16;
    int64_t group = GROUP_BYTES / (16 * K) / NT * NT;
    group = group < NT ? NT : group;
    if (ok && amx) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t m = 0; m < M; m++) quantize_row(x, io_bf16, K, a, m);
        memset(a.q + M * K, 0, (rows - M) * K);
        amx8_mm(w, a, scales, scales_bf16, bias, y, io_bf16, M, N, K, nthreads);
    } else if (ok) {
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) quantize_row(x, io_bf16, K, a, m);
            /* (the for's barrier: every row is quantized) each thread its own share of the blocks, in
             * groups: whole groups dealt out would leave 80 blocks in groups of 12 as 4 + 3 groups */
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t b_end = blocks * (t + 1) / nt;
            for (int64_t g0 = blocks * t / nt; g0 < b_end; g0 += group) {
                const int64_t g1 = b_end - g0 < group ? b_end : g0 + group;
                for (int64_t m0 = 0; m0 < M; m0 += MT) {
                    const int mr = M - m0 < MT ? (int)(M - m0) : MT;
                    for (int64_t b0 = g0; b0 < g1; b0 += NT) {
                        const int nb = g1 - b0 < NT ? (int)(g1 - b0) : NT;
                        switch (mr) {
                            case 1: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 1, b0, nb); break;
                            case 2: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 2, b0, nb); break;
                            case 3: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 3, b0, nb); break;
#if MT > 4
                            case 4: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 4, b0, nb); break;
                            case 5: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 5, b0, nb); break;
                            case 6: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 6, b0, nb); break;
                            case 7: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, 7, b0, nb); break;
#endif
                            default: rows_times_blocks(w, a, scales, scales_bf16, bias, y, io_bf16, N, K, m0, MT, b0, nb);
                        }
                    }
                }
            }
        }
    }
    free(a.q), free(a.d), free(a.qsum);
    return ok ? 0 : -1;
}
