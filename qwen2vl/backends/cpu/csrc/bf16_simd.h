/* AVX-512 helpers for bf16 elementwise kernels, shared by layer_ops.c, paged_decode.c and
 * vision_ops.c: masked bf16 <-> fp32 loads and stores with torch's rounding (nearest even), and
 * torch's exp.
 * Included by those files only inside their AVX-512 sections; kernels/__init__.py's build key
 * covers this file too. */
#ifndef QWEN2VL_BF16_SIMD_H
#define QWEN2VL_BF16_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include "kernels.h"

static inline __mmask16 tail(int64_t n) { /* lanes left of a row of n */
    return n <= 0 ? 0 : n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
}

static inline __m512 load(const bf16 *p, __mmask16 m) { /* 16 bf16 -> fp32, zeros where m is 0 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __m512 loadf(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

static inline __m512 rnd(__m512 v) { /* v rounded to bf16 (nearest even, as torch), kept in fp32 */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000)));
}

/* v rounded to bf16 into p. The high halves are gathered with a permute: gcc folds a narrowing
 * convert and its store into one vpmovdw to memory, which is slow on AMD's Zen 4/5. */
static inline void store(bf16 *p, __m512 v, __mmask16 m) {
    const __m512i high = _mm512_set_epi16(31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 29,
                                          27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm256_mask_storeu_epi16(p, m, _mm512_castsi512_si256(_mm512_permutexvar_epi16(high, _mm512_castps_si512(rnd(v)))));
}

/* exp in fp32: SLEEF's expf_u10, the one torch's vectorized CPU kernels (F.silu) call, step for step,
 * so SiLU matches torch's vectorized path bit for bit (its scalar tail uses libm's expf instead). */
static inline __m512 exp16(__m512 d) {
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.442695040888963407359924681001892137f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 s = _mm512_fmadd_ps(q, _mm512_set1_ps(-0.693145751953125f), d);
    s = _mm512_fmadd_ps(q, _mm512_set1_ps(-1.428606765330187045e-06f), s);
    __m512 u = _mm512_set1_ps(0.000198527617612853646278381f);
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00139304355252534151077271f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.00833336077630519866943359f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.0416664853692054748535156f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.166666671633720397949219f));
    u = _mm512_fmadd_ps(u, s, _mm512_set1_ps(0.5f));
    u = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_mul_ps(s, s), u, s));
    __m512i e = _mm512_cvtps_epi32(q), e1 = _mm512_srai_epi32(e, 1); /* u * 2^q in two steps (no overflow) */
    __m512 p1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e1, _mm512_set1_epi32(127)), 23));
    __m512 p2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(e, e1),
                                                                       _mm512_set1_epi32(127)), 23));
    u = _mm512_mul_ps(_mm512_mul_ps(u, p1), p2);
    u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_NLT_US), u); /* -inf -> 0 */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                                _mm512_set1_ps(__builtin_inff()));
}

static inline float exp1(float x) { return _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))); }

#endif
