/* Row top-k of float32 logits for the sampler: the k largest values of each row, sorted best first
 * (ties: the smaller column first), and their columns. Rows hold no NaN (-inf is fine).
 *
 * The torch version (backends/top_k.py) takes block maxima, then two torch.topk calls, which on
 * the CPU are scalar selections at several ns per element; here, per row:
 *   1. the maximum of every block of BLOCK columns (SIMD), the k best blocks kept in a heap: the k
 *      best tokens lie in blocks whose maximum is at least the k-th best block maximum (`floor`);
 *   2. those blocks only, 16 columns at a time, each column >= floor offered to a heap of k.
 * So a row costs about one SIMD read of it, as an argmax does. */
#include <math.h>
#include <immintrin.h>

#include "kernels.h"

#define BLOCK 128

/* The heaps keep (value, column) pairs with the worst at the root: a smaller value, or the same
 * value at a larger column. */
static int worse(float va, int64_t ca, float vb, int64_t cb) { return va < vb || (va == vb && ca > cb); }

static void swap(float *v, int64_t *c, int64_t i, int64_t j) {
    float tv = v[i]; v[i] = v[j]; v[j] = tv;
    int64_t tc = c[i]; c[i] = c[j]; c[j] = tc;
}

static void sift_down(float *v, int64_t *c, int64_t size, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < size && worse(v[l], c[l], v[m], c[m])) m = l;
        if (r < size && worse(v[r], c[r], v[m], c[m])) m = r;
        if (m == i) return;
        swap(v, c, i, m);
        i = m;
    }
}

/* Offer (x, col) to a heap of capacity k holding *size pairs. */
static void offer(float *v, int64_t *c, int64_t k, int64_t *size, float x, int64_t col) {
    if (*size < k) {
        int64_t i = (*size)++;
        v[i] = x, c[i] = col;
        while (i > 0 && worse(v[i], c[i], v[(i - 1) / 2], c[(i - 1) / 2])) {
            swap(v, c, i, (i - 1) / 2);
            i = (i - 1) / 2;
        }
    } else if (worse(v[0], c[0], x, col)) {
        v[0] = x, c[0] = col;
        sift_down(v, c, k, 0);
    }
}

static float block_max(const float *p, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
#if defined(__AVX512F__)
    __m512 acc = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(p + i));
    m = _mm512_reduce_max_ps(acc);
#else
    __m256 acc = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(p + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; i < n; i++) m = p[i] > m ? p[i] : m;
    return m;
}

/* Which of the 16 columns p[0..16) are >= floor, as bits. */
static unsigned at_least16(const float *p, float floor) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(floor), _CMP_GE_OQ);
#else
    __m256 f = _mm256_set1_ps(floor);
    unsigned lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), f, _CMP_GE_OQ));
    unsigned hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), f, _CMP_GE_OQ));
    return lo | hi << 8;
#endif
}

void top_k_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t k, float *values,
                int64_t *columns, float *maxima, int nthreads) {
    int64_t nb = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float *v = values + r * k, *m = maxima + r * nb;
        int64_t *c = columns + r * k, size = 0;
        for (int64_t b = 0; b < nb; b++) {
            m[b] = block_max(row + b * BLOCK, n - b * BLOCK < BLOCK ? n - b * BLOCK : BLOCK);
            offer(v, c, k, &size, m[b], b);
        }
        float floor = size == k ? v[0] : -INFINITY;
        size = 0;
        for (int64_t b = 0; b < nb; b++) {
            if (m[b] < floor) continue;
            int64_t j = b * BLOCK, end = n < j + BLOCK ? n : j + BLOCK;
            for (; j + 16 <= end; j += 16)
                for (unsigned bits = at_least16(row + j, floor); bits; bits &= bits - 1) {
                    int64_t col = j + __builtin_ctz(bits);
                    offer(v, c, k, &size, row[col], col);
                }
            for (; j < end; j++)
                if (row[j] >= floor) offer(v, c, k, &size, row[j], j);
        }
        for (int64_t s = k - 1; s > 0; s--) {  /* heap sort: the worst goes last */
            swap(v, c, 0, s);
            sift_down(v, c, s, 0);
        }
    }
}
