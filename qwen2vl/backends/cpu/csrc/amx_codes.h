/* int8 and int4 weights (int_gemv.c's layouts and kinds) times bf16 activations on the AMX bf16 tiles: the
 * prefill rows and large decode batches of a quantized model (the amx variant of bf16_gemm.c only).
 *
 * Why: int_gemv's VNNI tile quantizes the activations per block of 32 k and ran the 2B's prefill shapes at
 * ~700 GFLOP/s on a 2-vCPU Xeon, where the bf16 tiles run ~1,600-1,900: an int8 or int4 model reached its
 * first token later than the bf16 model it came from. AMX's int8 tiles can't take a scale per 32 k (a tile
 * row is 64 k, and a scale per block means a store per block). So each thread widens a chunk of the codes
 * (~1 MB of bf16, amx_tiles.h) into the bf16 B-tile layout in its own buffer, once, and every row group of
 * x passes over it while it sits in L2: the widening is paid once per chunk, the products at the bf16
 * tiles' rate.
 *
 * Values: INT8's codes are q + 128 with a scale per output row; q is exact in bf16 and the scale is
 * applied to the fp32 sums (y = s[n] * (x . q) + bias): the bf16 x as given, no activation quantization,
 * and no rounding but the sums' and the output's. INT4 (q + 8) and INT8G (q + 128) have a scale and a zero per group of k: the
 * weight (q * s + z, in fp32) is rounded once to bf16, as `dequantize(torch.bfloat16)` rounds it.
 */
#ifndef QWEN2VL_AMX_CODES_H
#define QWEN2VL_AMX_CODES_H
#include <omp.h>
#include <stdlib.h>

/* 32 codes -> 32 bf16 (code - offset) * scale + zero, where element j belongs to row j / 2 of the block
 * (with `exact`, scale 1 and zero 0: integers, exact in bf16). rows: the scale's and zero's lanes spread
 * to element pairs: j -> j / 2 for the first 16 elements, 8 + j / 2 for the next. */
static inline __m512i widen32(__m128i lo, __m128i hi, __m512 offset, __m512 s_lo, __m512 z_lo, __m512 s_hi,
                              __m512 z_hi, int exact) {
    __m512 a = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), offset);
    __m512 b = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), offset);
    if (!exact) a = _mm512_fmadd_ps(a, s_lo, z_lo), b = _mm512_fmadd_ps(b, s_hi, z_hi);
    return (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low half; round to nearest even */
}

/* One 64-byte line of codes, 16 rows x 4 k (row i: bytes 4i..4i+3), -> the two B-tile rows of its two k
 * pairs, [16 rows][2] bf16 each, at out and out + 32. */
static inline void widen_line(__m512i v, uint16_t *out, __m512 offset, const __m512 *s, const __m512 *z, int exact) {
    /* in each 128-bit lane (4 rows), the rows' first k pairs, then their second ones; then the lanes' first
     * halves before their second halves */
    const __m512i pairs = _mm512_set4_epi32(0x0f0e0b0a, 0x07060302, 0x0d0c0908, 0x05040100);
    v = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), _mm512_shuffle_epi8(v, pairs));
    const __m256i first = _mm512_castsi512_si256(v), second = _mm512_extracti64x4_epi64(v, 1);
    _mm512_storeu_si512(out, widen32(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1), offset,
                                     s[0], z[0], s[1], z[1], exact));
    _mm512_storeu_si512(out + 32, widen32(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1),
                                          offset, s[0], z[0], s[1], z[1], exact));
}

static inline __m512 load_scales(const void *p, int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
    return _mm512_loadu_ps(p);
}

/* One 16-row block of codes (K k) -> bf16 B-tile layout [K/2][16][2] at out. sz: the block's scales and
 * zeros per group ([K/group][2][16]), unused for INT8. */
static void widen_block(int kind, const uint8_t *w, const char *sz, int sz_bf16, int64_t K, int64_t group,
                        uint16_t *out) {
    const __m512i spread_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i spread_hi = _mm512_add_epi32(spread_lo, _mm512_set1_epi32(8));
    const int exact = kind == INT8, esz = sz_bf16 ? 2 : 4;
    const __m512 offset = _mm512_set1_ps(kind == INT4 ? 8.0f : 128.0f);
    __m512 s[2] = {_mm512_set1_ps(1), _mm512_set1_ps(1)}, z[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const int64_t per_line = kind == INT4 ? 8 : 4; /* k a 64-byte line holds */
    for (int64_t c = 0; c < K / per_line; c++) {
        const int64_t k = c * per_line;
        if (!exact && k % group == 0) {
            const char *g = sz + (k / group) * 32 * esz;
            const __m512 sc = load_scales(g, sz_bf16), zr = load_scales(g + 16 * esz, sz_bf16);
            s[0] = _mm512_permutexvar_ps(spread_lo, sc), s[1] = _mm512_permutexvar_ps(spread_hi, sc);
            z[0] = _mm512_permutexvar_ps(spread_lo, zr), z[1] = _mm512_permutexvar_ps(spread_hi, zr);
        }
        const __m512i v = _mm512_loadu_si512(w + c * 64);
        if (kind == INT4) { /* low nibbles: k .. k + 3, high nibbles: k + 4 .. k + 7 */
            const __m512i low = _mm512_set1_epi8(15);
            widen_line(_mm512_and_si512(v, low), out + k * 16, offset, s, z, 0);
            widen_line(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), out + (k + 4) * 16, offset, s, z, 0);
        } else {
            widen_line(v, out + k * 16, offset, s, z, exact);
        }
    }
}

/* C tile t + the epilogue -> y rows row0.. (those < M) of block n0: INT8's sums times the row's scale */
#define AMX_CODES_STORE(t, row0, n0)                                                                     \
    do {                                                                                                 \
        _tile_stored(t, c, 64);                                                                          \
        const __mmask16 mask = row_mask(N, n0);                                                          \
        const __m512 b = load_bias(bias, n0, mask);                                                      \
        const __m512 rs = kind == INT8 ? load_scales((const char *)sz + (n0) * esz, sz_bf16) : one;      \
        for (int r = 0; r < 16 && (row0) + r < M; r++)                                                   \
            store16(y + ((row0) + r) * N + (n0), _mm512_fmadd_ps(_mm512_loadu_ps(c + r * 16), rs, b), mask); \
    } while (0)

/* y [M, N] = x [M, K] @ W.T + bias, W the codes of `kind` (INT8: w, per-row scales sz; INT4 / INT8G: w,
 * scales and zeros sz per group). K % 32 == 0. -1 when the tiles are off or out of memory (nothing
 * written that the caller keeps: it runs int_gemv instead). */
int bf16_gemm_codes(int64_t kind, const uint8_t *w, const void *sz, int sz_bf16, const uint16_t *x, uint16_t *y,
                    const uint16_t *bias, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads) {
    if (amx_state <= 0 || K % 32 || (kind != INT8 && (group <= 0 || group % 32 || K % group))) return -1;
    const int64_t blocks = (N + 15) / 16, groups = (M + AMX_ROWS - 1) / AMX_ROWS, pairs = (blocks + 1) / 2;
    const int64_t per = amx_pairs_per_chunk(2 * 16 * 2 * K, pairs, nthreads), chunks = (pairs + per - 1) / per;
    const int64_t code_bytes = kind == INT4 ? 8 * K : 16 * K, esz = sz_bf16 ? 2 : 4; /* a block's codes */
    const int64_t sz_block = kind == INT8 ? 0 : (K / group) * 32 * esz; /* a block's scales and zeros */
    const size_t buf_elems = (size_t)per * 2 * 16 * K; /* a chunk of bf16 B tiles */
    uint16_t *tail, *bufs = aligned_alloc(64, (size_t)nthreads * buf_elems * sizeof *bufs);
    if (!bufs || amx_tail(x, M, K, &tail)) {
        free(bufs);
        return -1;
    }
    const __m512 one = _mm512_set1_ps(1);
#pragma omp parallel num_threads(nthreads)
    {
        float c[256];
        uint16_t *buf = bufs + (size_t)omp_get_thread_num() * buf_elems;
        amx_configure(); /* tile state is per thread */
#pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const int64_t b_first = chunk * per * 2;
            const int64_t b_end = b_first + per * 2 < blocks ? b_first + per * 2 : blocks;
            for (int64_t b = b_first; b < b_end; b++)
                widen_block((int)kind, w + b * code_bytes, (const char *)sz + b * sz_block, sz_bf16, K, group,
                            buf + (b - b_first) * 16 * K);
            for (int64_t g = 0; g < groups; g++) {
                const int64_t m0 = g * AMX_ROWS;
                const uint16_t *xa = (tail && g == groups - 1) ? tail : x + m0 * K;
                for (int64_t b0 = b_first; b0 < b_end; b0 += 2) {
                    const uint16_t *w0 = buf + (b0 - b_first) * 16 * K, *w1 = w0 + 16 * K;
                    const int two = b0 + 1 < b_end;
                    AMX_PASS(_tile_dpbf16ps, xa, w0, w1, two, K);
                    AMX_STORE_PASS(AMX_CODES_STORE, m0, b0, two);
                }
            }
        }
        _tile_release();
    }
    free(tail);
    free(bufs);
    return 0;
}
#endif
