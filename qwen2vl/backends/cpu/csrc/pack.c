/* pack.c: the kernels' weight layout, written at load.
 *
 * bf16_gemm.c, bf16w_gemm.c and int_gemv*.c read weights in blocks of 16 output rows with the rows
 * innermost: [ceil(N/16), W, 16] 32-bit words (a word is a k pair of bf16, or 4 int8 codes), so one
 * 64-byte line holds the same word of all 16 rows. Torch writes that transpose at ~1-4 GB/s (a copy
 * through a strided view); this one goes through 16 rows x 64 words at a time, reading each row's
 * words in order and writing whole lines, on `nthreads` threads (block rows split between them).
 * Rows past N are zeros. quantize_int8 below writes int8 codes straight into that layout. */
#include "kernels.h"
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include "avx2_io.h"

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

/* quantize_int8: w [n, k] (bf16 or fp32, w_bf16) -> pack_int8's codes [ceil(n/16), k/4, 16, 4] and
 * scales [ceil(n/16) * 16] in w's dtype, in one pass over w (backends/quant.py's torch code takes ~8
 * passes over float32 copies: 11-18x slower on the 2B's linears, benchmarks/load_int8.py).
 * The same bits as that torch code, step by step:
 *   s = max(max|w_row|, 1e-8f) / 127 in fp32; bf16 scales: s rounded to nearest even, then one bf16
 *   step up if that fell below s (the range must still cover the row);
 *   q = round(w / s) (an fp32 division, nearest even) clamped to [-127, 127]; code = q + 128.
 * Rows past n: code 128 (q = 0), scale 0. k % 4 == 0. Each thread takes blocks of 16 rows: a
 * block's 16 * k output bytes stay in cache while its rows' words are written 64 bytes apart. */
void quantize_int8(const void *w, int w_bf16, uint8_t *codes, void *scales, int64_t n, int64_t k, int nthreads) {
    const int64_t blocks = (n + ROWS - 1) / ROWS, esz = w_bf16 ? 2 : 4, k8 = k / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *dst = codes + b * k * ROWS;
        for (int64_t r = 0; r < ROWS; r++) {
            const int64_t row = b * ROWS + r;
            if (row >= n) {
                for (int64_t c = 0; c < k / 4; c++) memset(dst + c * 4 * ROWS + r * 4, 128, 4);
                if (w_bf16) ((uint16_t *)scales)[row] = 0;
                else ((float *)scales)[row] = 0;
                continue;
            }
            const char *x = (const char *)w + row * k * esz;
            __m256 mx = _mm256_setzero_ps();
            for (int64_t i = 0; i < k8; i += 8)
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), avx2_load8(x + i * esz, w_bf16)));
            float v[8], amax = 0;
            _mm256_storeu_ps(v, mx);
            for (int i = 0; i < 8; i++) amax = v[i] > amax ? v[i] : amax;
            for (int64_t i = k8; i < k; i++) {
                const float t = fabsf(load1(x, i, w_bf16));
                amax = t > amax ? t : amax;
            }
            float s = (amax > 1e-8f ? amax : 1e-8f) / 127.0f;
            if (w_bf16) {
                uint32_t u;
                memcpy(&u, &s, 4);
                uint32_t h = (u + 0x7fff + ((u >> 16) & 1)) >> 16; /* nearest even */
                float back;
                const uint32_t hu = h << 16;
                memcpy(&back, &hu, 4);
                h += back < s; /* one step up: s is positive and finite */
                ((uint16_t *)scales)[row] = (uint16_t)h;
                const uint32_t su = h << 16;
                memcpy(&s, &su, 4);
            } else {
                ((float *)scales)[row] = s;
            }
            const __m256 sv = _mm256_set1_ps(s);
            const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), off = _mm256_set1_epi32(128);
            for (int64_t i = 0; i < k8; i += 8) {
                __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(avx2_load8(x + i * esz, w_bf16), sv));
                q = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q, lo), hi), off); /* 1..255 */
                const __m128i h16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                const __m128i b8 = _mm_packus_epi16(h16, h16);
                const uint32_t w0 = (uint32_t)_mm_cvtsi128_si32(b8), w1 = (uint32_t)_mm_extract_epi32(b8, 1);
                memcpy(dst + (i / 4) * 4 * ROWS + r * 4, &w0, 4);
                memcpy(dst + (i / 4 + 1) * 4 * ROWS + r * 4, &w1, 4);
            }
            for (int64_t i = k8; i < k; i++) {
                const int32_t q = _mm_cvtss_si32(_mm_set_ss(load1(x, i, w_bf16) / s)); /* nearest even */
                dst[(i / 4) * 4 * ROWS + r * 4 + i % 4] = (uint8_t)((q < -127 ? -127 : q > 127 ? 127 : q) + 128);
            }
        }
    }
}
