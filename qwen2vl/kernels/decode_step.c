/* A whole decode step of the text decoder in one C call: every layer's ops, then the final norm.
 *
 * Why: at batch 1 the 2B's decoder makes ~280 kernel calls a step (5 linears and 5 small ops per
 * layer). From Python each costs ~10 us of module dispatch, ctypes argument conversion and
 * allocation, ~3 ms a step, more than a tenth of an int4 step. Here the same kernels are called in
 * the same order on the same values (so the result is the Python path's, bit for bit), from C.
 *
 * The kernels live in the other libraries (bf16_gemm.c, int_gemv.c, layer_ops.c, paged_decode.c):
 * the caller passes their addresses in the Decoder, and the weights' and the KV cache's addresses
 * in each Layer (qwen2vl/kernels/decode_step.py builds them once). Nothing here needs AVX-512 itself.
 */
#include <stdint.h>
#include <stddef.h>

typedef uint16_t bf16;

typedef void (*bf16_gemm_fn)(const void *w, const void *x, void *y, const void *bias, int64_t M, int64_t N,
                             int64_t K, int nthreads);
typedef int (*int8_gemm_fn)(const void *w, const void *scales, int scales_bf16, const void *x, void *y,
                            const void *bias, int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads);
typedef int (*int4_gemm_fn)(const void *w, const void *scales_zeros, int scales_bf16, const void *x, void *y,
                            const void *bias, int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group,
                            int nthreads);
typedef void (*rms_norm_fn)(const bf16 *x, const bf16 *res, bf16 *sum_out, const bf16 *w, bf16 *out, int64_t N,
                            int64_t D, float eps, int nthreads);
typedef void (*rotary_fn)(bf16 *qk, int64_t stride, const bf16 *cos, const bf16 *sin, int64_t N, int64_t H,
                          int64_t D, int nthreads);
typedef void (*silu_mul_fn)(const bf16 *g, int64_t g_stride, const bf16 *u, int64_t u_stride, bf16 *out, int64_t N,
                            int64_t I, int nthreads);
typedef int (*paged_decode_fn)(const bf16 *q, int64_t q_stride, const bf16 *k, int64_t k_stride, const bf16 *v,
                               int64_t v_stride, bf16 *k_cache, bf16 *v_cache, const int64_t *new_slots,
                               const int64_t *ctx_slots, int64_t ctx_stride, const int64_t *ctx_lens, bf16 *out,
                               int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int nthreads);

enum { BF16 = 0, INT8 = 1, INT4 = 2 };

/* One linear: y [M, n] = x [M, k] @ W.T + bias, W in its kernel's packed layout. */
typedef struct {
    int64_t kind; /* BF16, INT8 or INT4 */
    void *fn;     /* bf16_gemm, int8_gemm or int4_gemm */
    const void *w, *scales, *bias; /* scales: per row (INT8) or scales|zeros per group (INT4); bias bf16 or NULL */
    int64_t scales_bf16, n, k, group;
} Linear;

typedef struct {
    const bf16 *norm1, *norm2; /* input_layernorm, post_attention_layernorm weights */
    bf16 *k_cache, *v_cache;   /* this layer's [num_slots, Hkv, Dh] */
    Linear qkv, o, gate, up, down;
} Layer;

typedef struct {
    rms_norm_fn rms_norm;
    rotary_fn rotary;
    silu_mul_fn silu_mul;
    paged_decode_fn paged_decode;
    int64_t num_layers, hidden, inter, heads, kv_heads, head_dim;
    float eps;
    const bf16 *final_norm;
    const Layer *layers;
} Decoder;

int decode_step_supported(void) { return 1; }

/* Scratch bf16 values decode_step needs per token. */
int64_t decode_step_work(const Decoder *d) {
    const int64_t D = d->hidden, qkv = (d->heads + 2 * d->kv_heads) * d->head_dim;
    return 3 * D + qkv + d->heads * d->head_dim + 3 * d->inter;
}

static int linear(const Linear *l, const bf16 *x, bf16 *y, int64_t M, int nt) {
    switch (l->kind) {
    case BF16:
        ((bf16_gemm_fn)l->fn)(l->w, x, y, l->bias, M, l->n, l->k, nt);
        return 0;
    case INT8:
        return ((int8_gemm_fn)l->fn)(l->w, l->scales, (int)l->scales_bf16, x, y, l->bias, 1, M, l->n, l->k, nt);
    default:
        return ((int4_gemm_fn)l->fn)(l->w, l->scales, (int)l->scales_bf16, x, y, l->bias, 1, M, l->n, l->k,
                                     l->group, nt);
    }
}

/* FastTextModel.forward at decode, with the runner's attention: x [M, D] the new tokens' embeddings
 * (read only), out [M, D] the final-normed hidden states. cos, sin [M, Dh] their rotary tables; the
 * new tokens' k/v go to cache slots new_slots[M]; token m attends to ctx_slots[m * ctx_stride + c],
 * c < ctx_lens[m]. work: M * decode_step_work(d) bf16 values. Returns -1 when a kernel ran out of
 * memory, else 0. */
int decode_step(const Decoder *d, const bf16 *x, bf16 *out, const bf16 *cos, const bf16 *sin,
                const int64_t *new_slots, const int64_t *ctx_slots, int64_t ctx_stride, const int64_t *ctx_lens,
                int64_t M, bf16 *work, int nt) {
    const int64_t D = d->hidden, I = d->inter, Hq = d->heads, Hkv = d->kv_heads, Dh = d->head_dim;
    const int64_t QKV = (Hq + 2 * Hkv) * Dh;
    bf16 *res = work, *h = res + M * D, *y = h + M * D, *qkv = y + M * D, *att = qkv + M * QKV;
    bf16 *gate = att + M * Hq * Dh, *up = gate + M * I, *act = up + M * I;
    const bf16 *r = x; /* the residual stream: the embeddings, then res (summed in place) */
    int rc = 0;
    for (int64_t l = 0; l < d->num_layers && rc == 0; l++) {
        const Layer *L = d->layers + l;
        if (l == 0)
            d->rms_norm(x, NULL, NULL, L->norm1, h, M, D, d->eps, nt);
        else
            d->rms_norm(y, r, res, L->norm1, h, M, D, d->eps, nt), r = res;
        rc |= linear(&L->qkv, h, qkv, M, nt);
        d->rotary(qkv, QKV, cos, sin, M, Hq + Hkv, Dh, nt);
        rc |= d->paged_decode(qkv, QKV, qkv + Hq * Dh, QKV, qkv + (Hq + Hkv) * Dh, QKV, L->k_cache, L->v_cache,
                              new_slots, ctx_slots, ctx_stride, ctx_lens, att, M, Hq, Hkv, Dh, nt);
        rc |= linear(&L->o, att, y, M, nt);
        d->rms_norm(y, r, res, L->norm2, h, M, D, d->eps, nt), r = res;
        rc |= linear(&L->gate, h, gate, M, nt);
        rc |= linear(&L->up, h, up, M, nt);
        d->silu_mul(gate, I, up, I, act, M, I, nt);
        rc |= linear(&L->down, act, y, M, nt);
    }
    if (rc == 0)
        d->rms_norm(y, r, res, d->final_norm, out, M, D, d->eps, nt);
    return rc ? -1 : 0;
}
