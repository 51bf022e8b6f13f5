/* bf16 weights, fp32 arithmetic: bf16_gemm.c's job on CPUs without AVX-512 BF16 (AVX2 + FMA:
 * Zen 2/3, Intel client CPUs since Haswell), where torch's bf16 GEMMs are emulated and ~6-10x
 * slower than fp32. The weights stay bf16 in pack_bf16's layout (half the bytes decode streams,
 * one packed copy for both kernels); each is widened to fp32 in registers, which is exact: a bf16
 * is the top half of an fp32.
 *
 * Layout [N/16][K/2][16][2]: a 32-byte load holds 8 weight rows x one k pair, each row's pair one
 * 32-bit lane (k even in the low half). `<< 16` gives the even k's fp32, `& 0xffff0000` the odd
 * k's, and FMAs add them into fp32 accumulators, one 8-row register per activation row.
 * x [M, K] and y [M, N] are bf16 (the decoder) or fp32 (io_bf16 = 0: the vision tower computes in
 * fp32 on such CPUs); bias bf16 [N] or NULL, added in fp32 before the one rounding of a bf16 y
 * (nearest even, as torch). bf16 x is widened to an fp32 copy first, so a broadcast is one load.
 *
 * Every output is one fp32 FMA chain over k in order, in every tile, then + bias: a row's result
 * doesn't depend on how many rows share its batch, nor on the thread count. The tiles differ in
 * how many chains run side by side, which the FMA latency needs (4 cycles, 2 per cycle: 8 chains):
 *   stream (1-4 rows, decode): mr rows x nb 16-row blocks (1 x 4, 2 x 2, 3 x 1, 4 x 1), the
 *     weights read once, prefetched non-temporally 8 KB ahead in each block's stream;
 *   register tile (5+ rows): 6 rows x 16 columns, 12 accumulators, each weight load feeding 6
 *     FMAs and each broadcast 2; a group of blocks is walked by every 6-row tile while it sits in
 *     L2, so the weights come from memory once per call whatever M is (at 9-16 rows the job of
 *     bf16_gemm.c's wide tile) and the tile runs from cache.
 * Returns 0, or -1 when out of memory (the fp32 copy of a bf16 x).
 */
#include <stdint.h>
#include "kernels.h"
#include <stdlib.h>
#include <string.h>

#if !(defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__))
#error "needs AVX2 and FMA (native.py compiles it with -mavx2 -mfma -mf16c)"
#endif
#include <immintrin.h>

#define MT 6          /* rows of the register tile */
#define GROUP_BYTES (192 << 10) /* weights a group of blocks keeps in L2 for the register tile */
#define PF_STREAM 8192
#define PF_TILE 4096

static inline __m256 even_k(const bf16 *p) { /* rows' w[n, 2c] of one 32-byte load, as fp32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
}

static const uint32_t HIGH16[8] __attribute__((aligned(32))) = {
    0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000};

/* rows' w[n, 2c + 1]. The mask is an operand in memory, not a register: with it in one, the
 * 6-row tile's 12 accumulators + 2 weights + a broadcast + the mask were 16 live registers and gcc
 * kept an accumulator on the stack, a store-to-load chain through every FMA of its row (58 vs
 * 125 GFLOP/s, one thread, hot) */
static inline __m256 odd_k(const bf16 *p) {
    __m256 v = _mm256_loadu_ps((const float *)p);
    __asm__("vandps %1, %0, %0" : "+x"(v) : "m"(*(const __m256 *)HIGH16));
    return v;
}

/* mr rows of x (fp32, row stride ldx) times nb weight blocks from k pair 0 to K/2: acc[(r * nb + j) * 2 + h]
 * gets rows 8h..8h+7 of block j for x row r. mr and nb are constants after inlining, so the
 * arrays live in registers (at most 12 accumulators: with 2 weights and a broadcast, 15 of the 16).
 * pf: 0 none, 1 stream (non-temporal), 2 into all cache levels. */
static inline __attribute__((always_inline)) void tile(const bf16 *w, int64_t K, const float *x, int64_t ldx,
                                                       const int mr, const int nb, const int pf, __m256 *acc) {
    __m256 a[12]; /* local: written through acc, gcc stored all of them to memory at every k */
    for (int i = 0; i < mr * nb * 2; i++) a[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / 2; c++) {
        const bf16 *p[4];
        for (int j = 0; j < nb; j++) {
            p[j] = w + j * 16 * K + c * 32;
            if (pf == 1) __builtin_prefetch((const char *)p[j] + PF_STREAM, 0, 0);
            if (pf == 2) __builtin_prefetch((const char *)p[j] + PF_TILE, 0, 3);
        }
        for (int parity = 0; parity < 2; parity++) /* k = 2c, then 2c + 1: one chain, in order */
            for (int j = 0; j < nb; j++) { /* live: the accumulators, 2 weights, a broadcast */
                const __m256 w0 = parity ? odd_k(p[j]) : even_k(p[j]);
                const __m256 w1 = parity ? odd_k(p[j] + 16) : even_k(p[j] + 16);
                for (int r = 0; r < mr; r++) {
                    const __m256 xb = _mm256_broadcast_ss(x + r * ldx + 2 * c + parity);
                    a[(r * nb + j) * 2] = _mm256_fmadd_ps(w0, xb, a[(r * nb + j) * 2]);
                    a[(r * nb + j) * 2 + 1] = _mm256_fmadd_ps(w1, xb, a[(r * nb + j) * 2 + 1]);
                }
            }
    }
    for (int i = 0; i < mr * nb * 2; i++) acc[i] = a[i];
}

static inline __m256 load8(const void *p, int bf16) { /* 8 bf16 or fp32 -> fp32 */
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    return _mm256_loadu_ps(p);
}

/* acc (16 outputs: rows 0-7, 8-15 of a block) + bias to the first n (<= 16) of y */
static inline void store16(void *y, const __m256 *acc, const __m256 *b, int bf16, int n) {
    char tmp[64];
    void *dst = n < 16 ? (void *)tmp : y;
    __m256 v[2] = {_mm256_add_ps(acc[0], b[0]), _mm256_add_ps(acc[1], b[1])};
    if (!bf16) {
        _mm256_storeu_ps(dst, v[0]), _mm256_storeu_ps((float *)dst + 8, v[1]);
    } else { /* round to nearest even */
        __m256i h[2];
        for (int i = 0; i < 2; i++) {
            __m256i u = _mm256_castps_si256(v[i]);
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            h[i] = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        }
        _mm256_storeu_si256(dst, _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xd8));
    }
    if (n < 16) memcpy(y, tmp, n * (bf16 ? 2 : 4));
}

static inline void load_bias(const bf16 *bias, int64_t n0, int n, __m256 *b) {
    uint16_t tmp[16] = {0};
    if (bias) memcpy(tmp, bias + n0, n * 2);
    b[0] = load8(tmp, 1), b[1] = load8(tmp + 8, 1);
}

/* Blocks b0 .. b0 + nb (nb <= 4) times rows m0 .. m0 + mr (mr <= 4), streamed once. */
#define STREAM(mr, nb) tile(w + b0 * 16 * K, K, x + m0 * K, K, mr, nb, 1, acc)

static void stream(const bf16 *w, const float *x, char *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N,
                   int64_t K) {
    const int64_t blocks = (N + 15) / 16, m0 = 0, esz = io_bf16 ? 2 : 4;
    /* blocks side by side: 8 chains (3 rows: 6, as 3 x 2 blocks left gcc short of registers) */
    const int per = M == 1 ? 4 : M == 2 ? 2 : 1;
#pragma omp for schedule(static)
    for (int64_t b0 = 0; b0 < blocks; b0 += per) {
        const int nb = blocks - b0 < per ? (int)(blocks - b0) : per;
        __m256 acc[16];
        switch (M * 8 + nb) {
            case 8 + 1: STREAM(1, 1); break;
            case 8 + 2: STREAM(1, 2); break;
            case 8 + 3: STREAM(1, 3); break;
            case 8 + 4: STREAM(1, 4); break;
            case 16 + 1: STREAM(2, 1); break;
            case 16 + 2: STREAM(2, 2); break;
            case 24 + 1: STREAM(3, 1); break;
            default: STREAM(4, 1);
        }
        for (int j = 0; j < nb; j++) {
            const int64_t n0 = (b0 + j) * 16;
            const int n = N - n0 < 16 ? (int)(N - n0) : 16;
            __m256 b[2];
            load_bias(bias, n0, n, b);
            for (int r = 0; r < M; r++) store16(y + (r * N + n0) * esz, acc + (r * nb + j) * 2, b, io_bf16, n);
        }
    }
}

#define TILE(mr) tile(w + bj * 16 * K, K, x + m0 * K, K, mr, 1, m0 == 0 ? 2 : 0, acc)

static void tiled(const bf16 *w, const float *x, char *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N,
                  int64_t K) {
    const int64_t blocks = (N + 15) / 16, esz = io_bf16 ? 2 : 4;
    int64_t group = GROUP_BYTES / (32 * K);
    group = group < 1 ? 1 : group;
#pragma omp for schedule(static)
    for (int64_t g0 = 0; g0 < blocks; g0 += group) {
        const int64_t g1 = blocks - g0 < group ? blocks : g0 + group;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mr = M - m0 < MT ? (int)(M - m0) : MT;
            for (int64_t bj = g0; bj < g1; bj++) {
                __m256 acc[2 * MT];
                switch (mr) {
                    case 1: TILE(1); break;
                    case 2: TILE(2); break;
                    case 3: TILE(3); break;
                    case 4: TILE(4); break;
                    case 5: TILE(5); break;
                    default: TILE(MT);
                }
                const int64_t n0 = bj * 16;
                const int n = N - n0 < 16 ? (int)(N - n0) : 16;
                __m256 b[2];
                load_bias(bias, n0, n, b);
                for (int r = 0; r < mr; r++) store16(y + ((m0 + r) * N + n0) * esz, acc + 2 * r, b, io_bf16, n);
            }
        }
    }
}

int bf16w_gemm(const bf16 *w, const void *x, void *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N, int64_t K,
               int nthreads) {
    float *xf = io_bf16 ? malloc(M * K * sizeof(float)) : (float *)x;
    if (!xf) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        if (io_bf16) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < K; k++) {
                    const uint32_t v = (uint32_t)((const bf16 *)x)[m * K + k] << 16;
                    memcpy(xf + m * K + k, &v, 4);
                }
        }
        if (M <= 4)
            stream(w, xf, y, bias, io_bf16, M, N, K);
        else
            tiled(w, xf, y, bias, io_bf16, M, N, K);
    }
    if (io_bf16) free(xf);
    return 0;
}
