/* bf16 weights times bf16 activations, fp32 accumulation, with AVX-512 BF16 `vdpbf16ps`.
 *
 * Why not oneDNN: on this Zen 5 its reordered-weight decode GEMV streamed the 2B's weights at
 * 44-67 GB/s while plain reads ran at ~75 GB/s (the small q/k/v and o shapes worst), and its
 * fixed cost per call is ~30 us. Decode is a pure weight stream, so this kernel is a weight
 * stream and little else: one 64-byte load feeds 16 output rows x 2 k, software prefetch keeps
 * the reads ahead of the arithmetic. Batched decode of 9-16 rows streams each weight block once
 * through all the rows (the wide tile); more rows (prefill) use a register tile of 3 weight
 * blocks x 8 rows, which measured as fast as oneDNN's GEMM (283 rows: 0.96-1.0x of its time).
 * Figures in docs/performance.md.
 *
 * Weight layout, in blocks of 16 output rows so each 32-bit lane of a 512-bit register
 * accumulates one row (N padded to 16 with zero rows by the caller):
 *   [N/16][K/2][16][2] bf16: for k pair c, rows n0..n0+15, each with (w[n, 2c], w[n, 2c+1]).
 * `vdpbf16ps` multiplies that by an activation pair (x[2c], x[2c+1]) broadcast to every lane
 * and adds both products into the row's fp32 accumulator.
 * x [M, K] and y [M, N] bf16, row-major, K even; bias bf16 [N] or NULL, added in fp32 before the
 * one rounding to bf16 (round to nearest even, as torch does). Built by qwen2vl/kernels/__init__.py.
 */
#include <stdint.h>
#include "kernels.h"
#include <string.h>

#if !(defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__))
#error "needs AVX-512 BF16 (native.py compiles it with -mavx512f -mavx512bw -mavx512bf16)"
#endif
#include <immintrin.h>


#define MV 4 /* rows of x per pass of the streaming tile (decode) */
#define MT 8 /* rows of x per pass of the register tile (prefill) */
#define NT 3 /* weight blocks per pass of the register tile: 24 accumulators of 32 registers */
#define MW 16 /* rows of x per pass of the wide tile (batched decode): one pass over the weights at 16 rows */
#ifndef WIDE_MAX
#define WIDE_MAX 16 /* up to this many rows the wide tile, beyond it the register tile */
#endif
/* Prefetch distances, measured: streaming 8 KB ahead, non-temporally on AMD (each weight is read once);
 * the register tile 4 KB ahead into all levels on its first pass (later passes re-read the
 * blocks from L1/L2), every 64-byte line (every other line left the 2B's weights streaming at
 * 48 GB/s in layer order at 8 rows, 63 GB/s with all: 1.3x the step at 8-16 rows, 1.06x at 283). */
#define PF_STREAM 8192
#define PF_TILE 4096

static inline __m512bh bcast_pair(const uint16_t *p) { /* x[k], x[k+1] to every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

static inline __m512 load_bias(const uint16_t *bias, int64_t n0, __mmask16 mask) {
    if (!bias) return _mm512_setzero_ps();
    __m256i b = _mm256_maskz_loadu_epi16(mask, bias + n0);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline void store16(uint16_t *p, __m512 v, __mmask16 mask) { /* round to nearest even */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

static inline __mmask16 row_mask(int64_t N, int64_t n0) {
    return N - n0 >= 16 ? 0xffff : (__mmask16)((1u << (N - n0)) - 1);
}

/* One weight block (16 rows, streamed once) times rows m0..m0+mr of x: two accumulator chains
 * per row so the dot-product latency never waits on memory. */
static inline __attribute__((always_inline)) void stream_tile(const uint16_t *w, int64_t K, const uint16_t *x,
                                                              const int mr, __m512 *acc) {
    __m512 a0[MV], a1[MV];
    for (int r = 0; r < mr; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K - 2; k += 4) {
        const uint16_t *wk = w + k * 16; /* two 64-byte lines: k pairs k/2 and k/2 + 1 */
        __builtin_prefetch((const char *)wk + PF_STREAM, 0, STREAM_LOCALITY);
        __builtin_prefetch((const char *)wk + 64 + PF_STREAM, 0, STREAM_LOCALITY);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        for (int r = 0; r < mr; r++) {
            a0[r] = _mm512_dpbf16_ps(a0[r], w0, bcast_pair(x + r * K + k));
            a1[r] = _mm512_dpbf16_ps(a1[r], w1, bcast_pair(x + r * K + k + 2));
        }
    }
    if (K % 4) { /* an odd number of k pairs: the last one */
        __m512bh wl = (__m512bh)_mm512_loadu_si512(w + (K - 2) * 16);
        for (int r = 0; r < mr; r++) a0[r] = _mm512_dpbf16_ps(a0[r], wl, bcast_pair(x + r * K + K - 2));
    }
    for (int r = 0; r < mr; r++) acc[r] = _mm512_add_ps(a0[r], a1[r]);
}

/* nb (<= NT) weight blocks times rows m0..m0+mr (<= MT) of x: each weight load feeds mr dot
 * products and each activation broadcast nb, so the tile is bound by arithmetic, not loads. */
static inline __attribute__((always_inline)) void register_tile(const uint16_t *w, int64_t K, const uint16_t *x,
                                                                const int mr, const int nb, int first_pass,
                                                                __m512 *acc) {
    __m512 a[NT][MT];
    for (int j = 0; j < nb; j++)
        for (int r = 0; r < mr; r++) a[j][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh wv[NT];
        for (int j = 0; j < nb; j++) {
            const uint16_t *p = w + j * 16 * K + k * 16;
            if (first_pass) __builtin_prefetch((const char *)p + PF_TILE, 0, 3);
            wv[j] = (__m512bh)_mm512_loadu_si512(p);
        }
        for (int r = 0; r < mr; r++) {
            __m512bh xb = bcast_pair(x + r * K + k);
            for (int j = 0; j < nb; j++) a[j][r] = _mm512_dpbf16_ps(a[j][r], wv[j], xb);
        }
    }
    for (int j = 0; j < nb; j++)
        for (int r = 0; r < mr; r++) acc[j * MT + r] = a[j][r];
}

/* One weight block (16 rows, streamed once) times up to MW rows of x. Batched decode of 9-16 rows
 * in the register tile made two passes, the first streaming the weights from memory at 8 rows'
 * arithmetic per byte, which this machine's memory can't feed at the tile's rate; here each byte
 * feeds all the rows, so the stream needs half the bandwidth and the arithmetic sets the pace. */
static inline __attribute__((always_inline)) void wide_tile(const uint16_t *w, int64_t K, const uint16_t *x,
                                                            const int mr, __m512 *acc) {
    __m512 a[MW];
    for (int r = 0; r < mr; r++) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        const uint16_t *p = w + k * 16;
        __builtin_prefetch((const char *)p + PF_STREAM, 0, STREAM_LOCALITY);
        __m512bh wv = (__m512bh)_mm512_loadu_si512(p);
        for (int r = 0; r < mr; r++) a[r] = _mm512_dpbf16_ps(a[r], wv, bcast_pair(x + r * K + k));
    }
    for (int r = 0; r < mr; r++) acc[r] = a[r];
}

/* The tiles take mr and nb as constants after inlining, so their arrays live in registers. */
#define STREAM(mr) stream_tile(wb, K, x + m0 * K, mr, acc)
#define TILE(mr)                                                       \
    switch (nb) {                                                      \
        case 1: register_tile(wb, K, x + m0 * K, mr, 1, m0 == 0, acc); break; \
        case 2: register_tile(wb, K, x + m0 * K, mr, 2, m0 == 0, acc); break; \
        default: register_tile(wb, K, x + m0 * K, mr, NT, m0 == 0, acc);      \
    }

static void stream(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M, int64_t N,
                   int64_t K, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const __mmask16 mask = row_mask(N, n0);
        const __m512 b = load_bias(bias, n0, mask);
        const uint16_t *wb = w + n0 * K;
        for (int64_t m0 = 0; m0 < M; m0 += MV) {
            __m512 acc[MV];
            const int mr = M - m0 < MV ? (int)(M - m0) : MV;
            switch (mr) {
                case 1: STREAM(1); break;
                case 2: STREAM(2); break;
                case 3: STREAM(3); break;
                default: STREAM(MV);
            }
            for (int r = 0; r < mr; r++) store16(y + (m0 + r) * N + n0, _mm512_add_ps(acc[r], b), mask);
        }
    }
}

#define WIDE(mr) wide_tile(wb, K, x + m0 * K, mr, acc)

static void wide(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M, int64_t N,
                 int64_t K, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const __mmask16 mask = row_mask(N, n0);
        const __m512 b = load_bias(bias, n0, mask);
        const uint16_t *wb = w + n0 * K;
        for (int64_t m0 = 0; m0 < M; m0 += MW) { /* passes after the first read the block from cache */
            __m512 acc[MW];
            const int mr = M - m0 < MW ? (int)(M - m0) : MW;
            switch (mr) {
                case 1: WIDE(1); break;
                case 2: WIDE(2); break;
                case 3: WIDE(3); break;
                case 4: WIDE(4); break;
                case 5: WIDE(5); break;
                case 6: WIDE(6); break;
                case 7: WIDE(7); break;
                case 8: WIDE(8); break;
                case 9: WIDE(9); break;
                case 10: WIDE(10); break;
                case 11: WIDE(11); break;
                case 12: WIDE(12); break;
                case 13: WIDE(13); break;
                case 14: WIDE(14); break;
                case 15: WIDE(15); break;
                default: WIDE(MW);
            }
            for (int r = 0; r < mr; r++) store16(y + (m0 + r) * N + n0, _mm512_add_ps(acc[r], b), mask);
        }
    }
}

static void tiled(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M, int64_t N,
                  int64_t K, int nthreads) {
    const int64_t blocks = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b0 = 0; b0 < blocks; b0 += NT) {
        const int nb = blocks - b0 < NT ? (int)(blocks - b0) : NT;
        const uint16_t *wb = w + b0 * 16 * K;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            __m512 acc[NT * MT];
            const int mr = M - m0 < MT ? (int)(M - m0) : MT;
            switch (mr) {
                case 1: TILE(1); break;
                case 2: TILE(2); break;
                case 3: TILE(3); break;
                case 4: TILE(4); break;
                case 5: TILE(5); break;
                case 6: TILE(6); break;
                case 7: TILE(7); break;
                default: TILE(MT);
            }
            for (int j = 0; j < nb; j++) {
                const int64_t n0 = (b0 + j) * 16;
                const __mmask16 mask = row_mask(N, n0);
                const __m512 b = load_bias(bias, n0, mask);
                for (int r = 0; r < mr; r++) store16(y + (m0 + r) * N + n0, _mm512_add_ps(acc[j * MT + r], b), mask);
            }
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include "amx_tiles.h"
#include "bf16_amx.h"
#include "amx_codes.h"
#define HAVE_AMX 1
#else
#define HAVE_AMX 0
static int amx_state = -1;
static int amx_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M, int64_t N,
                    int64_t K, int nthreads) {
    (void)w, (void)x, (void)y, (void)bias, (void)M, (void)N, (void)K, (void)nthreads;
    return -1;
}
int bf16_gemm_amx(int enable) { /* built without AMX: never on */
    (void)enable;
    return 0;
}
int bf16_gemm_codes(int64_t kind, const uint8_t *w, const void *sz, int sz_bf16, const uint16_t *x, uint16_t *y,
                    const uint16_t *bias, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads) {
    (void)kind, (void)w, (void)sz, (void)sz_bf16, (void)x, (void)y, (void)bias, (void)M, (void)N, (void)K;
    (void)group, (void)nthreads;
    return -1;
}
#endif

/* y [M, N] = x [M, K] @ w.T + bias. Up to MV rows stream the weights once; more use the tiles. AMX
 * tiles, where built and switched on, take every call of more than MT rows: batched decode of 9-16
 * rows too, where the wide tile is compute-bound on a Xeon (11.7 GB/s of weights at 16 rows, AMX
 * 22.5, read probe ~24-27; at 5 rows the register tile streams faster than AMX, 25.8 vs 23.0). When
 * they can't run, the AVX-512 tiles. */
void bf16_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M, int64_t N,
               int64_t K, int nthreads) {
    if (HAVE_AMX && M > MT && K % 32 == 0 && amx_state > 0 && amx_gemm(w, x, y, bias, M, N, K, nthreads) == 0)
        return;
    if (M <= MV)
        stream(w, x, y, bias, M, N, K, nthreads);
    else if (M > MT && M <= WIDE_MAX)
        wide(w, x, y, bias, M, N, K, nthreads);
    else
        tiled(w, x, y, bias, M, N, K, nthreads);
}

