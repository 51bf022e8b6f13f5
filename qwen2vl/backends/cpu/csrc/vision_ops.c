/* The vision tower's elementwise bf16 ops, one C call each: QuickGELU, the 2-D rotary on q and k,
 * and the attention's softmax, all in place.
 *
 * For one 448x448 image (1024 patches, 32 blocks) torch spends ~0.3 s of the tower's ~1.8 s on
 * these on 2 cores: each is several ops that each read and write every value (QuickGELU three,
 * rotary in float32 eight), where one pass does. Each rounds where torch rounds (the comment above
 * each function says where): the results equal torch's bit for bit (tests/test_vision_ops.py).
 * Built by qwen2vl/kernels/vision_ops.py.
 */
#include <stdint.h>
#include "kernels.h"


#if !(defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__))
#error "needs AVX-512 F/BW (native.py compiles it with -mavx512f -mavx512bw)"
#endif
#include "bf16_simd.h"


/* x * sigmoid(1.702 * x) in place on n values, as torch computes it on bf16 tensors:
 *   t = bf16(1.702f * x), s = bf16(1 / (1 + exp(-t))), x' = bf16(x * s) */
void quick_gelu(bf16 *x, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail(n - i);
        const __m512 v = load(x + i, m);
        const __m512 t = rnd(_mm512_mul_ps(v, _mm512_set1_ps(1.702f)));
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), t));
        const __m512 s = rnd(_mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
        store(x + i, _mm512_mul_ps(v, s), m);
    }
}

/* The tower's rotary on heads 0..H-1 of each row of qkv (row stride `stride`, heads of D side by
 * side: q then k of the [3, heads, D] qkv output), cos and sin float32 [N, D]. As
 * `apply_rotary(q.float(), cos, sin).to(bf16)`: in float32, each product and the sum rounded to
 * float32, then once to bf16. */
__attribute__((optimize("fp-contract=off"))) /* torch rounds each product: no fused multiply-add */
void vision_rotary(bf16 *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                   int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin + n * D;
        for (int64_t h = 0; h < H; h++) {
            bf16 *x = qkv + n * stride + h * D;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 m = tail(half - j);
                const __m512 x1 = load(x + j, m), x2 = load(x + half + j, m);
                const __m512 a = _mm512_sub_ps(_mm512_mul_ps(x1, loadf(c + j, m)), _mm512_mul_ps(x2, loadf(s + j, m)));
                const __m512 b = _mm512_add_ps(_mm512_mul_ps(x2, loadf(c + half + j, m)),
                                               _mm512_mul_ps(x1, loadf(s + half + j, m)));
                store(x + j, a, m);
                store(x + half + j, b, m);
            }
        }
    }
}

#define SOFTMAX_KEEP 8192 /* rows up to this long keep their exps (32 KB on the stack), longer ones redo them */

/* Softmax in place over each of the R rows of n bf16 scores, as torch.softmax on bf16: in float32,
 * exp(x - max) times 1 / sum, rounded once to bf16. */
void softmax_rows(bf16 *x, int64_t R, int64_t n, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < R; r++) {
        bf16 *row = x + r * n;
        float kept[SOFTMAX_KEEP];
        const int keep = n <= SOFTMAX_KEEP;
        __m512 mx = _mm512_set1_ps(-__builtin_inff());
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail(n - j);
            mx = _mm512_mask_max_ps(mx, m, mx, load(row + j, m));
        }
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail(n - j);
            const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(load(row + j, m), top)));
            if (keep) _mm512_mask_storeu_ps(kept + j, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail(n - j);
            const __m512 e = keep ? _mm512_maskz_loadu_ps(m, kept + j) : exp16(_mm512_sub_ps(load(row + j, m), top));
            store(row + j, _mm512_mul_ps(e, inv), m);
        }
    }
}

