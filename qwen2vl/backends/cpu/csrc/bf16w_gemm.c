/* bf16 weights, fp32 arithmetic: bf16_gemm.c's job on CPUs without AVX-512 BF16 (AVX2 + FMA:
 * Zen 2/3, Intel client CPUs since Haswell), where torch's bf16 GEMMs are emulated and ~6-10x
 * slower than fp32. The weights stay bf16 in pack_bf16's layout (half the bytes decode streams,
 * one packed copy for both kernels); each is widened to fp32 in registers, which is exact: a bf16
 * is the top half of an fp32.
 *
 * Layout [N/16][K/2][16][2]: a 32-byte load holds 8 weight rows x one k pair, each row's pair one
 * 32-bit lane (k even in the low half). `<< 16` gives the even k's fp32, `& 0xffff0000` the odd
 * k's, and FMAs add them into fp32 accumulators, one 8-row register per activation row.
 * (With AVX-512 a 64-byte load is all 16 rows of the pair.)
 * x [M, K] and y [M, N] are bf16 (the decoder) or fp32 (io_bf16 = 0: the vision tower computes in
 * fp32 on such CPUs); bias bf16 [N] or NULL, added in fp32 before the one rounding of a bf16 y
 * (nearest even, as torch). bf16 x is widened to an fp32 copy first, so a broadcast is one load.
 *
 * Every output is one fp32 FMA chain over k in order, in every tile, then + bias: a row's result
 * doesn't depend on how many rows share its batch, nor on the thread count. The tiles differ in
 * how many chains run side by side, which the FMA latency needs (4 cycles, 2 per cycle: 8 chains):
 *   stream (1-4 rows, decode): mr rows x nb 16-row blocks (STREAM_BLOCKS_*), the weights read
 *     once, prefetched 8 KB ahead (non-temporally on AMD) in each block's stream;
 *   register tile (5+ rows): 6 rows x 1 block (12 accumulators of 16 registers; each weight load
 *     feeds 6 FMAs, each broadcast 2); a group of blocks is walked by every row tile while it sits
 *     in L2, so the weights come from memory once per call whatever M is (at 9-16 rows the job of
 *     bf16_gemm.c's wide tile) and the tile runs from cache.
 * Compiled with AVX-512F (native.py's first variant, for AVX-512 CPUs without BF16) the same code
 * runs on 512-bit registers: one per block, 32 of them, a register tile of 8 rows x 3 blocks.
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
#include "avx2_io.h"

#define GROUP_BYTES (192 << 10) /* weights a group of blocks keeps in L2 for the register tile */
#define PF_STREAM 8192
#define PF_TILE 4096

#ifdef __AVX512F__
/* AVX-512 without BF16 (Skylake-X, Cascade Lake, Ice Lake): a 64-byte load is a block's 16 rows x
 * one k pair, and 32 registers hold a register tile of 8 rows x 3 blocks (24 accumulators). */
typedef __m512 vec;
#define H 1      /* registers per 16-row block */
#define NREG 32
#define MT 8     /* register tile: MT rows x NT blocks */
#define NT 3
/* streaming tile: blocks side by side for 1, 2, 3, 4 rows (8 accumulator chains, 6 for 3 rows) */
#define STREAM_BLOCKS_1 8
#define STREAM_BLOCKS_2 4
#define STREAM_BLOCKS_3 2
#define STREAM_BLOCKS_4 2
static inline vec even_k(const bf16 *p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16)); }
static inline vec odd_k(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32((int)0xffff0000)));
}
static inline vec bcast(const float *p) { return _mm512_set1_ps(*p); }
static inline vec fma_(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm512_setzero_ps(); }
#else
/* AVX2: a 32-byte load is 8 rows x one k pair, a block two registers; 16 registers hold 6 rows x 1 block. */
typedef __m256 vec;
#define H 2
#define NREG 16
#define MT 6
#define NT 1
/* 8 chains (3 rows: 6, as 3 x 2 blocks left gcc short of registers: an accumulator on the stack) */
#define STREAM_BLOCKS_1 4
#define STREAM_BLOCKS_2 2
#define STREAM_BLOCKS_3 1
#define STREAM_BLOCKS_4 1
static inline vec even_k(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
}
static const uint32_t HIGH16[8] __attribute__((aligned(32))) = {
    0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000, 0xffff0000};
/* The mask is an operand in memory, not a register: with it in one, the 6-row tile's 12
 * accumulators + 2 weights + a broadcast + the mask were 16 live registers and gcc kept an
 * accumulator on the stack, a store-to-load chain through every FMA of its row (58 vs 125
 * GFLOP/s, one thread, hot). */
static inline vec odd_k(const bf16 *p) {
    __m256 v = _mm256_loadu_ps((const float *)p);
    __asm__("vandps %1, %0, %0" : "+x"(v) : "m"(*(const __m256 *)HIGH16));
    return v;
}
static inline vec bcast(const float *p) { return _mm256_broadcast_ss(p); }
static inline vec fma_(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec zero(void) { return _mm256_setzero_ps(); }
#endif
#define MAXACC 24

/* mr rows of x (fp32, row stride ldx) times nb weight blocks from k pair 0 to K/2: acc[(r * nb + j) * H + h]
 * gets the block's rows 16h/H.. of block j for x row r. mr and nb are constants after inlining, so
 * the arrays live in registers. pf: 0 none, 1 stream (non-temporal), 2 into all cache levels. */
static inline __attribute__((always_inline)) void tile(const bf16 *w, int64_t K, const float *x, int64_t ldx,
                                                       const int mr, const int nb, const int pf, vec *acc) {
    /* every weight of the k pair converted first where it fits the registers, else block by block */
    const int all_weights = nb * H + mr * nb * H + 1 < NREG;
    vec a[MAXACC]; /* local: written through acc, gcc stored all of them to memory at every k */
    for (int i = 0; i < mr * nb * H; i++) a[i] = zero();
    for (int64_t c = 0; c < K / 2; c++) {
        const bf16 *p[8];
        for (int j = 0; j < nb; j++) {
            p[j] = w + j * 16 * K + c * 32;
            if (pf == 1) __builtin_prefetch((const char *)p[j] + PF_STREAM, 0, STREAM_LOCALITY);
            if (pf == 2) __builtin_prefetch((const char *)p[j] + PF_TILE, 0, 3);
        }
        for (int parity = 0; parity < 2; parity++) { /* k = 2c, then 2c + 1: one chain, in order */
            vec wv[8 * H];
            for (int j = 0; j < nb; j++) {
                for (int h = 0; h < H; h++) wv[j * H + h] = parity ? odd_k(p[j] + 32 / H * h) : even_k(p[j] + 32 / H * h);
                if (all_weights && j < nb - 1) continue;
                for (int r = 0; r < mr; r++) {
                    const vec xb = bcast(x + r * ldx + 2 * c + parity);
                    for (int i = all_weights ? 0 : j * H; i < (j + 1) * H; i++)
                        a[r * nb * H + i] = fma_(wv[i], xb, a[r * nb * H + i]);
                }
            }
        }
    }
    for (int i = 0; i < mr * nb * H; i++) acc[i] = a[i];
}

/* y[0..n) (n <= 16) = one block's 16 outputs acc + bias b, rounded to bf16 (nearest even) or fp32 */
static inline void store16(void *y, const vec *acc, const vec *b, int bf16, int n) {
#ifdef __AVX512F__
    char tmp[64];
    void *dst = n < 16 ? (void *)tmp : y;
    const __m512 v = _mm512_add_ps(acc[0], b[0]);
    if (!bf16) {
        _mm512_storeu_ps(dst, v);
    } else {
        __m512i u = _mm512_castps_si512(v);
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
        _mm256_storeu_si256(dst, _mm512_cvtepi32_epi16(u));
    }
    if (n < 16) memcpy(y, tmp, n * (bf16 ? 2 : 4));
#else
    const __m256 v[2] = {_mm256_add_ps(acc[0], b[0]), _mm256_add_ps(acc[1], b[1])};
    avx2_store16(y, v, bf16, n);
#endif
}

static inline void load_bias(const bf16 *bias, int64_t n0, int n, vec *b) { /* zeros past n, or all if NULL */
    uint16_t t[16] = {0};
    if (bias) memcpy(t, bias + n0, n * 2);
#ifdef __AVX512F__
    b[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)t)), 16));
#else
    for (int h = 0; h < 2; h++)
        b[h] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(t + 8 * h))), 16));
#endif
}

/* y rows m0.. (mr of them) for blocks b0.. (nb of them): acc + bias, stored */
static inline void store_tile(char *y, const vec *acc, const bf16 *bias, int io_bf16, int64_t m0, int mr,
                              int64_t b0, int nb, int64_t N) {
    const int64_t esz = io_bf16 ? 2 : 4;
    for (int j = 0; j < nb; j++) {
        const int64_t n0 = (b0 + j) * 16;
        const int n = N - n0 < 16 ? (int)(N - n0) : 16;
        vec b[H];
        load_bias(bias, n0, n, b);
        for (int r = 0; r < mr; r++) store16(y + ((m0 + r) * N + n0) * esz, acc + (r * nb + j) * H, b, io_bf16, n);
    }
}

/* Blocks b0.. (nb of them, a constant after inlining, else one at a time: the same sums) times
 * rows m0.. (mr), stored. */
static inline __attribute__((always_inline)) void blocks_times_rows(const bf16 *w, const float *x, char *y,
                                                                    const bf16 *bias, int io_bf16, int64_t N,
                                                                    int64_t K, int64_t m0, const int mr, int64_t b0,
                                                                    int nb, const int full, const int pf) {
    vec acc[MAXACC];
    if (nb == full) {
        tile(w + b0 * 16 * K, K, x + m0 * K, K, mr, full, pf, acc);
        store_tile(y, acc, bias, io_bf16, m0, mr, b0, full, N);
    } else {
        for (int j = 0; j < nb; j++) {
            tile(w + (b0 + j) * 16 * K, K, x + m0 * K, K, mr, 1, pf, acc);
            store_tile(y, acc, bias, io_bf16, m0, mr, b0 + j, 1, N);
        }
    }
}

/* Up to 4 rows: each thread streams its blocks once, `per` of them side by side. */
static inline __attribute__((always_inline)) void stream_rows(const bf16 *w, const float *x, char *y,
                                                              const bf16 *bias, int io_bf16, int64_t N, int64_t K,
                                                              const int mr, const int per) {
    const int64_t blocks = (N + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t b0 = 0; b0 < blocks; b0 += per)
        blocks_times_rows(w, x, y, bias, io_bf16, N, K, 0, mr, b0, blocks - b0 < per ? (int)(blocks - b0) : per, per,
                          1);
}

static void stream(const bf16 *w, const float *x, char *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N,
                   int64_t K) {
    switch (M) {
        case 1: stream_rows(w, x, y, bias, io_bf16, N, K, 1, STREAM_BLOCKS_1); break;
        case 2: stream_rows(w, x, y, bias, io_bf16, N, K, 2, STREAM_BLOCKS_2); break;
        case 3: stream_rows(w, x, y, bias, io_bf16, N, K, 3, STREAM_BLOCKS_3); break;
        default: stream_rows(w, x, y, bias, io_bf16, N, K, 4, STREAM_BLOCKS_4);
    }
}

#define TILE(mr) blocks_times_rows(w, x, y, bias, io_bf16, N, K, m0, mr, b0, nb, NT, m0 == 0 ? 2 : 0)

/* More rows: each thread takes groups of blocks (about GROUP_BYTES of weights); every MT-row tile
 * walks the group NT blocks at a time, the first one bringing it from memory into L2. */
static void tiled(const bf16 *w, const float *x, char *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N,
                  int64_t K) {
    const int64_t blocks = (N + 15) / 16;
    int64_t group = GROUP_BYTES / (32 * K) / NT * NT;
    group = group < NT ? NT : group;
#pragma omp for schedule(static)
    for (int64_t g0 = 0; g0 < blocks; g0 += group) {
        const int64_t g1 = blocks - g0 < group ? blocks : g0 + group;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int mr = M - m0 < MT ? (int)(M - m0) : MT;
            for (int64_t b0 = g0; b0 < g1; b0 += NT) {
                const int nb = g1 - b0 < NT ? (int)(g1 - b0) : NT;
                switch (mr) {
                    case 1: TILE(1); break;
                    case 2: TILE(2); break;
                    case 3: TILE(3); break;
                    case 4: TILE(4); break;
                    case 5: TILE(5); break;
#if MT > 6
                    case 6: TILE(6); break;
                    case 7: TILE(7); break;
#endif
                    default: TILE(MT);
                }
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
