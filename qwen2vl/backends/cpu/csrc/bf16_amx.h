/* AMX bf16 tiles for bf16_gemm.c's calls of more than 8 rows (prefill, the vision tower, batched decode), on
 * Sapphire Rapids and later; included only when the amx variant is compiled (-mamx-tile -mamx-bf16, native.py).
 *
 * Why: prefill and the vision tower are compute-bound, and `tdpbf16ps` does a 16x32 by 32x16 bf16
 * product (8192 multiply-adds) per instruction, several times the AVX-512 BF16 register tile's rate.
 * pack_bf16's layout [N/16][K/2][16][2] is already AMX's B-tile layout: 16 rows of 64 bytes, row c
 * holding the k pair c of the block's 16 output rows, so a block times 32 k is one tile load with a
 * 64-byte stride. x [M, K] row-major is the A tile as it stands (16 rows of 32 bf16, stride 2K).
 *
 * Each output accumulates its k pairs in order inside the tile unit. Rows past M are read from a
 * zero-padded copy of the last rows, so no tile reads past x. The tiles are off until the
 * Python side switches them on (gemm.bf16_library: at first use, unless QWEN2VL_AMX=0, and only if a
 * checked product passes); when Linux refuses, when switched off, or when the tail buffer can't be
 * allocated, the AVX-512 tiles run. Measured on a 2-vCPU Xeon (docs/performance.md, AMX tier).
 */
#ifndef QWEN2VL_BF16_AMX_H
#define QWEN2VL_BF16_AMX_H
#include <stdlib.h>

static int amx_state = 0; /* 0: not asked yet (off), 1: on, -1: switched off or refused */

int bf16_gemm_amx(int enable) { return amx_switch(&amx_state, enable); }

/* C tile t (16 x 16 fp32) + bias -> y rows m0.. (those < M) of block n0, rounded once to bf16 */
#define AMX_STORE(t, row0, n0)                                                                     \
    do {                                                                                           \
        _tile_stored(t, c, 64);                                                                    \
        const __mmask16 mask = row_mask(N, n0);                                                    \
        const __m512 b = load_bias(bias, n0, mask);                                                \
        for (int r = 0; r < 16 && (row0) + r < M; r++)                                             \
            store16(y + ((row0) + r) * N + (n0), _mm512_add_ps(_mm512_loadu_ps(c + r * 16), b), mask); \
    } while (0)

/* *tail = x's last M % AMX_ROWS rows zero-padded to AMX_ROWS (NULL where M is a multiple), so no tile
 * reads past x. -1 when out of memory. */
static int amx_tail(const uint16_t *x, int64_t M, int64_t K, uint16_t **tail) {
    *tail = NULL;
    if (M % AMX_ROWS == 0) return 0;
    if (!(*tail = calloc((size_t)AMX_ROWS * K, sizeof **tail))) return -1;
    memcpy(*tail, x + (M / AMX_ROWS) * AMX_ROWS * K, (size_t)(M % AMX_ROWS) * K * sizeof **tail);
    return 0;
}

/* y [M, N] = x [M, K] @ w.T + bias with K % 32 == 0. Returns -1 when out of memory (nothing written).
 * A thread's chunks of weight-block pairs, every row group over each (amx_tiles.h). */
static int amx_gemm(const uint16_t *w, const uint16_t *x, uint16_t *y, const uint16_t *bias, int64_t M,
                    int64_t N, int64_t K, int nthreads) {
    const int64_t blocks = (N + 15) / 16, groups = (M + AMX_ROWS - 1) / AMX_ROWS, pairs = (blocks + 1) / 2;
    const int64_t per = amx_pairs_per_chunk(2 * 16 * 2 * K, pairs, nthreads), chunks = (pairs + per - 1) / per;
    uint16_t *tail;
    if (amx_tail(x, M, K, &tail)) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        float c[256];
        amx_configure(); /* tile state is per thread */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < chunks * groups; task++) {
          const int64_t chunk = task / groups, g = task % groups, m0 = g * AMX_ROWS;
          for (int64_t pair = chunk * per; pair < pairs && pair < (chunk + 1) * per; pair++) {
            const int64_t b0 = pair * 2;
            const uint16_t *xa = (tail && g == groups - 1) ? tail : x + m0 * K;
            const uint16_t *w0 = w + b0 * 16 * K, *w1 = w0 + 16 * K;
            const int two = b0 + 1 < blocks;
            AMX_PASS(_tile_dpbf16ps, xa, w0, w1, two, K);
            AMX_STORE_PASS(AMX_STORE, m0, b0, two);
          }
        }
        _tile_release();
    }
    free(tail);
    return 0;
}
#endif
