/* AVX2 loads and stores of 16 bf16 or fp32 values as two __m256 (fp32), the first n of them, shared by
 * the AVX2 kernels (int_gemv_avx2.c, bf16w_gemm.c). Stores round to bf16 to nearest even, as torch
 * does (NaN payloads aside). */
#ifndef QWEN2VL_AVX2_IO_H
#define QWEN2VL_AVX2_IO_H
#include <immintrin.h>
#include <string.h>

static inline float load1(const void *p, int64_t k, int bf16) { /* element k, bf16 or fp32 -> fp32 */
    if (!bf16) return ((const float *)p)[k];
    const uint32_t u = (uint32_t)((const uint16_t *)p)[k] << 16;
    float t;
    memcpy(&t, &u, 4);
    return t;
}

static inline __m256 avx2_load8(const void *p, int bf16) { /* 8 bf16 or fp32 -> fp32 */
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p)), 16));
    return _mm256_loadu_ps(p);
}

/* 16 values of row-block n0 (bias, scales) with zeros past n (< 16) */
static inline void avx2_load16(const void *p, int bf16, int n, __m256 *v) {
    if (n < 16) {
        char tmp[64] = {0};
        memcpy(tmp, p, n * (bf16 ? 2 : 4));
        avx2_load16(tmp, bf16, 16, v);
        return;
    }
    v[0] = avx2_load8(p, bf16), v[1] = avx2_load8((const char *)p + 8 * (bf16 ? 2 : 4), bf16);
}

static inline void avx2_store16(void *p, const __m256 *v, int bf16, int n) { /* the first n (<= 16) */
    char tmp[64];
    void *dst = n < 16 ? (void *)tmp : p;
    if (!bf16) {
        _mm256_storeu_ps(dst, v[0]), _mm256_storeu_ps((float *)dst + 8, v[1]);
    } else {
        __m256i h[2];
        for (int i = 0; i < 2; i++) {
            __m256i u = _mm256_castps_si256(v[i]);
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            h[i] = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
        }
        /* packus works per 128-bit lane: 0-3 8-11 4-7 12-15, put back in order */
        _mm256_storeu_si256(dst, _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xd8));
    }
    if (n < 16) memcpy(p, tmp, n * (bf16 ? 2 : 4));
}
#endif
