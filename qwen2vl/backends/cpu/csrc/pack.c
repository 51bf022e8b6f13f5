/* pack.c: the kernels' weight layout, written at load.
 *
 * bf16_gemm.c, bf16w_gemm.c and int_gemv*.c read weights in blocks of 16 output rows with the rows
 * innermost: [ceil(N/16), W, 16] 32-bit words (a word is a k pair of bf16, or 4 int8 codes), so one
 * 64-byte line holds the same word of all 16 rows. Torch writes that transpose at ~1-4 GB/s (a copy
 * through a strided view); this one goes through 16 rows x 64 words at a time, reading each row's
 * words in order and writing whole lines, on `nthreads` threads (block rows split between them).
 * Rows past N are zeros. */
#include "kernels.h"

#define ROWS 16
#define TILE 64

void pack_rows16(const uint32_t *w, uint32_t *out, int64_t n, int64_t words, int nthreads) {
    int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        uint32_t *dst = out + b * words * ROWS;
        int64_t rows = n - b * ROWS < ROWS ? n - b * ROWS : ROWS;
        for (int64_t k0 = 0; k0 < words; k0 += TILE) {
            int64_t k1 = k0 + TILE < words ? k0 + TILE : words;
            for (int64_t r = 0; r < ROWS; r++) {
                const uint32_t *src = w + (b * ROWS + r) * words;
                if (r < rows)
                    for (int64_t k = k0; k < k1; k++) dst[k * ROWS + r] = src[k];
                else
                    for (int64_t k = k0; k < k1; k++) dst[k * ROWS + r] = 0;
            }
        }
    }
}
