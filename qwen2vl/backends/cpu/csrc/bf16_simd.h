/* The SIMD vocabulary of the bf16 elementwise kernels (layer_ops.c, paged_decode.c, vision_ops.c),
 * one per tier they are built for, so each kernel is written once:
 *
 *   f32x16   16 fp32 lanes: one __m512 on AVX-512 (F/BW), two __m256 (lo = lanes 0-7) on AVX2
 *   mask16   which lanes of a row's last chunk are in use: tail(n), FULL; a __mmask16 on AVX-512,
 *            the count of leading lanes on AVX2 (every mask here is a prefix)
 *   load / store      16 bf16 <-> fp32, lanes outside the mask read as 0 and left unwritten; store
 *                     rounds to bf16 to nearest even, as torch does (rnd keeps that rounding in fp32)
 *   loadf / storef    the same for fp32
 *   vadd vsub vmul vdiv vfma vmax vsqrt vset vzero vsel, hsum hmax, exp16 exp1
 *   f32x8    8 fp32 lanes (a __m256 on both tiers) for sums in torch's 8-wide order
 *
 * Both tiers give the same bits: each lane computes the same operations, and hsum/hmax reduce in
 * the same tree (8 + 8, then 4 + 4, 2 + 2, 1 + 1: gcc's _mm512_reduce_add_ps and torch's
 * vec_reduce_all). AVX2 has no masked 16-bit loads or stores, so a bf16 tail goes through a
 * 16-lane stack copy: nothing past the end of a buffer is read or written.
 * The kernels are compiled with -ffp-contract=off (native.py): an FMA happens where vfma says so
 * and nowhere else, since gcc fuses a*b+c of these operations once FMA is on, where torch rounds
 * twice. Helpers are always inlined: called, an f32x16 would go through memory. */
#ifndef QWEN2VL_BF16_SIMD_H
#define QWEN2VL_BF16_SIMD_H
#include <immintrin.h>
#include <stdint.h>
#include "kernels.h"

#define SIMD static inline __attribute__((always_inline))

/* exp in fp32: SLEEF's expf_u10, the one torch's vectorized CPU kernels (F.silu) call, step for step,
 * so SiLU matches torch's vectorized path bit for bit (its scalar tail uses libm's expf instead).
 * One body for both tiers, on d: V is the vector type, P its intrinsics' prefix, W its width, ROUND
 * its round-to-integer; leaves u, to which exp16 adds the ends of the range. */
#define EXP_POLY(V, P, W, ROUND)                                                                           \
    V q = ROUND(P##_mul_ps(d, P##_set1_ps(1.442695040888963407359924681001892137f)),                       \
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                            \
    V s = P##_fmadd_ps(q, P##_set1_ps(-0.693145751953125f), d);                                            \
    s = P##_fmadd_ps(q, P##_set1_ps(-1.428606765330187045e-06f), s);                                       \
    V u = P##_set1_ps(0.000198527617612853646278381f);                                                     \
    u = P##_fmadd_ps(u, s, P##_set1_ps(0.00139304355252534151077271f));                                    \
    u = P##_fmadd_ps(u, s, P##_set1_ps(0.00833336077630519866943359f));                                    \
    u = P##_fmadd_ps(u, s, P##_set1_ps(0.0416664853692054748535156f));                                     \
    u = P##_fmadd_ps(u, s, P##_set1_ps(0.166666671633720397949219f));                                      \
    u = P##_fmadd_ps(u, s, P##_set1_ps(0.5f));                                                             \
    u = P##_add_ps(P##_set1_ps(1.0f), P##_fmadd_ps(P##_mul_ps(s, s), u, s));                               \
    /* u * 2^q in two steps (no overflow) */                                                               \
    const V##i e = P##_cvtps_epi32(q), e1 = P##_srai_epi32(e, 1);                                          \
    const V p1 = P##_castsi##W##_ps(P##_slli_epi32(P##_add_epi32(e1, P##_set1_epi32(127)), 23));           \
    const V##i e2 = P##_sub_epi32(e, e1);                                                                  \
    const V p2 = P##_castsi##W##_ps(P##_slli_epi32(P##_add_epi32(e2, P##_set1_epi32(127)), 23));           \
    u = P##_mul_ps(P##_mul_ps(u, p1), p2)

#ifndef __FMA__
#error "needs FMA (native.py compiles every variant of these kernels with -mfma)"
#endif
typedef __m256 f32x8;

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* --- AVX-512 ----------------------------------------------------------------------------------- */
typedef __m512 f32x16;
typedef __mmask16 mask16;
#define FULL ((mask16)0xffff)

SIMD mask16 tail(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : (mask16)((1u << n) - 1); }

SIMD f32x16 vset(float x) { return _mm512_set1_ps(x); }
SIMD f32x16 vzero(void) { return _mm512_setzero_ps(); }
SIMD f32x16 vadd(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
SIMD f32x16 vsub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
SIMD f32x16 vmul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
SIMD f32x16 vdiv(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
SIMD f32x16 vfma(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); } /* a * b + c, rounded once */
SIMD f32x16 vmax(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
SIMD f32x16 vsqrt(f32x16 a) { return _mm512_sqrt_ps(a); }
SIMD f32x16 vsel(mask16 m, f32x16 a, f32x16 b) { return _mm512_mask_blend_ps(m, b, a); } /* a in m, else b */
SIMD f32x8 lo8(f32x16 v) { return _mm512_castps512_ps256(v); }
SIMD f32x8 hi8(f32x16 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

SIMD f32x16 load(const bf16 *p, mask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
SIMD f32x16 loadf(const float *p, mask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SIMD void storef(float *p, f32x16 v, mask16 m) { _mm512_mask_storeu_ps(p, m, v); }

SIMD f32x16 rnd(f32x16 v) { /* v rounded to bf16 (nearest even, as torch), kept in fp32 */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000)));
}

/* v rounded to bf16 into p. The high halves are gathered with a permute: gcc folds a narrowing
 * convert and its store into one vpmovdw to memory, which is slow on AMD's Zen 4/5. */
SIMD void store(bf16 *p, f32x16 v, mask16 m) {
    const __m512i high = _mm512_set_epi16(31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 29,
                                          27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm256_mask_storeu_epi16(p, m, _mm512_castsi512_si256(_mm512_permutexvar_epi16(high, _mm512_castps_si512(rnd(v)))));
}

SIMD f32x16 exp16(f32x16 d) {
    EXP_POLY(__m512, _mm512, 512, _mm512_roundscale_ps);
    u = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, _mm512_set1_ps(-104.0f), _CMP_NLT_US), u); /* -inf -> 0 */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(100.0f), d, _CMP_LT_OQ), u,
                                _mm512_set1_ps(__builtin_inff()));
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* --- AVX2 + FMA + F16C: each operation on the two halves --------------------------------------- */
typedef struct { __m256 lo, hi; } f32x16;
typedef int mask16;
#define FULL 16

SIMD mask16 tail(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 16 : (int)n; }

#define BOTH(expr_lo, expr_hi) ((f32x16){expr_lo, expr_hi})
SIMD f32x16 vset(float x) { return BOTH(_mm256_set1_ps(x), _mm256_set1_ps(x)); }
SIMD f32x16 vzero(void) { return BOTH(_mm256_setzero_ps(), _mm256_setzero_ps()); }
SIMD f32x16 vadd(f32x16 a, f32x16 b) { return BOTH(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
SIMD f32x16 vsub(f32x16 a, f32x16 b) { return BOTH(_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)); }
SIMD f32x16 vmul(f32x16 a, f32x16 b) { return BOTH(_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)); }
SIMD f32x16 vdiv(f32x16 a, f32x16 b) { return BOTH(_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)); }
SIMD f32x16 vfma(f32x16 a, f32x16 b, f32x16 c) {
    return BOTH(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
SIMD f32x16 vmax(f32x16 a, f32x16 b) { return BOTH(_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)); }
SIMD f32x16 vsqrt(f32x16 a) { return BOTH(_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)); }
SIMD f32x8 lo8(f32x16 v) { return v.lo; }
SIMD f32x8 hi8(f32x16 v) { return v.hi; }

SIMD __m256i lanes8(mask16 m, int first) { /* all ones in lanes first.. first+7 that are below m */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(m - first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
SIMD f32x16 vsel(mask16 m, f32x16 a, f32x16 b) { /* a in m, else b */
    if (m >= 16) return a;
    return BOTH(_mm256_blendv_ps(b.lo, a.lo, _mm256_castsi256_ps(lanes8(m, 0))),
                _mm256_blendv_ps(b.hi, a.hi, _mm256_castsi256_ps(lanes8(m, 8))));
}

SIMD __m256 widen8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
SIMD f32x16 load(const bf16 *p, mask16 m) {
    if (m >= 16) return BOTH(widen8(_mm_loadu_si128((const __m128i *)p)),
                             widen8(_mm_loadu_si128((const __m128i *)(p + 8))));
    bf16 buf[16] = {0};
    for (int i = 0; i < m; i++) buf[i] = p[i];
    return BOTH(widen8(_mm_loadu_si128((const __m128i *)buf)), widen8(_mm_loadu_si128((const __m128i *)(buf + 8))));
}
SIMD f32x16 loadf(const float *p, mask16 m) {
    if (m >= 16) return BOTH(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
    return BOTH(_mm256_maskload_ps(p, lanes8(m, 0)), _mm256_maskload_ps(p + 8, lanes8(m, 8)));
}
SIMD void storef(float *p, f32x16 v, mask16 m) {
    if (m >= 16) {
        _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi);
    } else {
        _mm256_maskstore_ps(p, lanes8(m, 0), v.lo), _mm256_maskstore_ps(p + 8, lanes8(m, 8), v.hi);
    }
}

SIMD __m256i rnd8(__m256 v) { /* the rounded bits: see rnd */
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000));
}
SIMD f32x16 rnd(f32x16 v) { /* v rounded to bf16 (nearest even, as torch), kept in fp32 */
    return BOTH(_mm256_castsi256_ps(rnd8(v.lo)), _mm256_castsi256_ps(rnd8(v.hi)));
}

/* v rounded to bf16 into p: the high halves packed (packus keeps lanes 0-3 | 8-11 | 4-7 | 12-15), then
 * the middle quarters swapped back */
SIMD void store(bf16 *p, f32x16 v, mask16 m) {
    const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_srli_epi32(rnd8(v.lo), 16),
                                                                   _mm256_srli_epi32(rnd8(v.hi), 16)), 0xd8);
    if (m >= 16) {
        _mm256_storeu_si256((__m256i *)p, h);
        return;
    }
    bf16 buf[16];
    _mm256_storeu_si256((__m256i *)buf, h);
    for (int i = 0; i < m; i++) p[i] = buf[i];
}

SIMD __m256 exp8(__m256 d) {
    EXP_POLY(__m256, _mm256, 256, _mm256_round_ps);
    u = _mm256_and_ps(u, _mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_NLT_US)); /* -inf -> 0 */
    return _mm256_blendv_ps(u, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
}
SIMD f32x16 exp16(f32x16 d) { return BOTH(exp8(d.lo), exp8(d.hi)); }
#undef BOTH

#else
#error "needs AVX-512 F/BW or AVX2 + FMA + F16C (native.py compiles it with the -m flags of its variant)"
#endif

/* --- both tiers -------------------------------------------------------------------------------- */

SIMD f32x8 load8(const bf16 *p) { /* 8 bf16 -> fp32, all there */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
SIMD f32x8 vzero8(void) { return _mm256_setzero_ps(); }
SIMD void storef8(float *p, f32x8 v) { _mm256_storeu_ps(p, v); }
SIMD f32x8 vadd8(f32x8 a, f32x8 b) { return _mm256_add_ps(a, b); }
SIMD f32x8 vfma8(f32x8 a, f32x8 b, f32x8 c) { return _mm256_fmadd_ps(a, b, c); }

/* The 8 lanes reduced as torch's AVX2 vec_reduce_all: (4 + 4), (2 + 2), (1 + 1) */
SIMD float hsum8(f32x8 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_shuffle_ps(x, x, 0x4e));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 0xb1)));
}
SIMD float hmax8(f32x8 v) {
    __m128 x = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    x = _mm_max_ps(x, _mm_shuffle_ps(x, x, 0x4e));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 0xb1)));
}
/* The 16 lanes: (8 + 8), then as hsum8: gcc's _mm512_reduce_add_ps and torch's AVX-512 vec_reduce_all */
SIMD float hsum(f32x16 v) { return hsum8(_mm256_add_ps(lo8(v), hi8(v))); }
SIMD float hmax(f32x16 v) { return hmax8(_mm256_max_ps(hi8(v), lo8(v))); }

SIMD float exp1(float x) { return _mm_cvtss_f32(_mm256_castps256_ps128(lo8(exp16(vset(x))))); }

#undef EXP_POLY
#endif
