/* What the AMX kernels (bf16_amx.h, amx_codes.h, int8_amx.h) share: the tile state Linux hands out, one
 * shape for all eight tiles, a pass of 32 rows over two weight blocks and its four stores, and the order a
 * thread walks the weights in. bf16_gemm.c and int8_mm.c include it
 * themselves, before their kernel's header (native.py hashes the headers a source includes, one level).
 */
#ifndef QWEN2VL_AMX_TILES_H
#define QWEN2VL_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 32         /* x rows per pass: two A tiles */
#define AMX_CHUNK (1 << 20) /* bytes of weights a thread keeps in L2 while every row group passes over them */

/* Whether Linux grants this process the 8 KB of tile state: it hands it out only to a process that
 * asks (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA). */
static int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* A kernel's exported switch over its `state` (0: not asked yet, off; 1: on; -1: switched off or
 * refused): `enable` 1 asks Linux and switches on, 0 switches off, -1 only asks. 1 when on. */
static int amx_switch(int *state, int enable) {
    if (enable == 0) *state = -1;
    if (enable == 1) *state = amx_request() ? 1 : -1;
    return *state > 0;
}

/* tiles 0-3: C (16 x 16 sums), 4-5: A (two groups of 16 rows), 6-7: B (two blocks of 16 outputs);
 * all 16 rows of 64 bytes. The configuration is per thread. */
static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
}

/* One pass of rows xa (two A tiles of 16 rows, K elements a row) over one or two B blocks (w0, and w1 where
 * `two`) into C tiles 0-3: 0 and 2 rows 0-15 and 16-31 of block w0, 1 and 3 of w1. `dot` is the tiles'
 * product (_tile_dpbf16ps for bf16 elements, _tile_dpbsud for int8 codes): a tile row is 64 bytes of k,
 * and a B block's k at w + k * 16 in either layout. */
#define AMX_PASS(dot, xa, w0, w1, two, K)                                      \
    do {                                                                       \
        const int64_t row_bytes_ = (K) * (int64_t)sizeof *(xa);                \
        _tile_zero(0);                                                         \
        _tile_zero(1);                                                         \
        _tile_zero(2);                                                         \
        _tile_zero(3);                                                         \
        for (int64_t k = 0; k < (K); k += 64 / (int64_t)sizeof *(xa)) {        \
            _tile_loadd(4, (xa) + k, row_bytes_);                              \
            _tile_loadd(5, (xa) + 16 * (K) + k, row_bytes_);                   \
            _tile_loadd(6, (w0) + k * 16, 64);                                 \
            dot(0, 4, 6);                                                      \
            dot(2, 5, 6);                                                      \
            if (two) {                                                         \
                _tile_loadd(7, (w1) + k * 16, 64);                             \
                dot(1, 4, 7);                                                  \
                dot(3, 5, 7);                                                  \
            }                                                                  \
        }                                                                      \
    } while (0)

/* AMX_PASS's four C tiles through `store` (a macro of the tile, its first row, its first output): rows m0..
 * of blocks b0 and, where `two`, b0 + 1 */
#define AMX_STORE_PASS(store, m0, b0, two)           \
    do {                                              \
        store(0, m0, (b0) * 16);                      \
        store(2, (m0) + 16, (b0) * 16);               \
        if (two) {                                    \
            store(1, m0, ((b0) + 1) * 16);            \
            store(3, (m0) + 16, ((b0) + 1) * 16);     \
        }                                             \
    } while (0)

/* Weight-block pairs (`pair_bytes` each) a thread takes as one chunk: about AMX_CHUNK bytes, and at
 * least 4 chunks a thread so the threads end together. Every row group of x passes over a chunk while
 * it sits in L2; row groups outermost re-read all the weights once per 32 rows: on a 2-vCPU Xeon that
 * ran the 2B's bf16 prefill shapes at ~1,000-1,400 GFLOP/s against ~1,600-1,900 this way. */
static int64_t amx_pairs_per_chunk(int64_t pair_bytes, int64_t pairs, int nthreads) {
    int64_t per = AMX_CHUNK / pair_bytes;
    const int64_t fair = (pairs + 4 * nthreads - 1) / (4 * nthreads);
    if (per > fair) per = fair;
    return per < 1 ? 1 : per;
}
#endif
