/* AMX int8 tiles for int8_mm.c's calls (the amx variant only: -mamx-tile -mamx-int8, native.py).
 *
 * Why: on a 2-vCPU Xeon with AMX the VNNI register tile ran ~860-890 GFLOP/s-equivalent, below
 * the bf16 AMX tiles (1,600-1,900), so matmul="int8" made prefill slower there. `tdpbsud` sums
 * 16 x 64 signed (x) by 64 x 16 unsigned (the codes) bytes into int32 per instruction.
 *
 * pack_int8's layout [N/16][K/4][16][4] is AMX's int8 B-tile layout: for 64 k, 16 rows of 64
 * bytes (k quad c: the block's 16 channels x 4 codes), 1 KB contiguous. The quantized rows [M, K]
 * are the A tiles as they stand (16 rows of 64 bytes, stride K), padded with zero rows to 32. The
 * int32 sums are exact, like VNNI's, and the formula after them (store_tile) is the same code, so
 * the output is the VNNI tile's bit for bit (tests/test_int8_mm.py where the CPU has AMX).
 * Order as bf16_amx.h's (amx_tiles.h). Off until the Python side switches it on
 * (int8_mm.library: unless QWEN2VL_AMX=0, and only if a checked product is VNNI's).
 */
#ifndef QWEN2VL_INT8_AMX_H
#define QWEN2VL_INT8_AMX_H
static int amx8_state = 0; /* 0: not asked (off), 1: on, -1: switched off or refused */

int int8_mm_amx(int enable) { return amx_switch(&amx8_state, enable); }

/* C tile t (16 x 16 int32) to y rows row0.. (those < M) of outputs n0.. through store_tile */
#define AMX8_STORE(t, row0, n0)                                                                           \
    do {                                                                                                 \
        _tile_stored(t, c, 64);                                                                          \
        if ((row0) < M)                                                                                  \
            store_tile((const ivec *)c, a, scales, scales_bf16, bias, (char *)y, io_bf16, row0,          \
                       M - (row0) < 16 ? (int)(M - (row0)) : 16, (n0) / 16, 1, N);                               \
    } while (0)

/* a.q holds ceil(M / 32) * 32 rows (the last zero past M). K % 64 == 0. */
static void amx8_mm(const uint8_t *w, Rows a, const void *scales, int scales_bf16, const void *bias, void *y,
                    int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    const int64_t blocks = (N + 15) / 16, groups = (M + AMX_ROWS - 1) / AMX_ROWS, pairs = (blocks + 1) / 2;
    const int64_t per = amx_pairs_per_chunk(2 * 16 * K, pairs, nthreads), chunks = (pairs + per - 1) / per;
#pragma omp parallel num_threads(nthreads)
    {
        __m512i c[16];
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t task = 0; task < chunks * groups; task++) {
          const int64_t chunk = task / groups, m0 = (task % groups) * AMX_ROWS;
          for (int64_t pair = chunk * per; pair < pairs && pair < (chunk + 1) * per; pair++) {
            const int64_t b0 = pair * 2;
            const int two = b0 + 1 < blocks;
            const int8_t *xa = a.q + m0 * K;
            const uint8_t *w0 = w + b0 * 16 * K, *w1 = w0 + 16 * K;
            AMX_PASS(_tile_dpbsud, xa, w0, w1, two, K);
            AMX_STORE_PASS(AMX8_STORE, m0, b0, two);
          }
        }
        _tile_release();
    }
}
#endif
