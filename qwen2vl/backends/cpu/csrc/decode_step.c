/* A whole decode step of the text decoder in one C call: every layer's ops, then the final norm.
 *
 * Why: at batch 1 the 2B's decoder makes ~280 kernel calls a step (5 linears and 5 small ops per
 * layer). From Python each costs ~10 us of module dispatch, ctypes argument conversion and
 * allocation, ~3 ms a step, more than a tenth of an int4 step. Here the same kernels are called in
 * the same order on the same values (so the result is the Python path's, bit for bit), from C.
 *
 * The kernels live in the other libraries (bf16_gemm.c or bf16w_gemm.c, int_gemv.c, layer_ops.c,
 * paged_decode.c):
 * the caller passes their addresses in the Decoder, and the weights' and the KV cache's addresses
 * in each Layer (qwen2vl/kernels/decode_step.py builds them once;
 * kernels.h declares the structs). Nothing here needs AVX-512 itself.
 */
#include <stdint.h>
#include <stddef.h>
#include "kernels.h"

/* The kernels' types, from their prototypes in kernels.h (the Decoder and each Linear hold them as
 * plain addresses). */
typedef __typeof__(&bf16_gemm) bf16_gemm_fn;
typedef __typeof__(&bf16w_gemm) bf16w_gemm_fn;
typedef __typeof__(&int8_gemm) int8_gemm_fn;
typedef __typeof__(&int4_gemm) int4_gemm_fn;
_Static_assert(__builtin_types_compatible_p(int4_gemm_fn, __typeof__(&int8g_gemm)), "INT8G is called as INT4");
typedef __typeof__(&bf16_gemm_codes) bf16_gemm_codes_fn;
typedef __typeof__(&rms_norm) rms_norm_fn;
typedef __typeof__(&rotary) rotary_fn;
typedef __typeof__(&silu_mul) silu_mul_fn;
typedef __typeof__(&paged_decode) paged_decode_fn;

/* Scratch bf16 values decode_step needs per token. */
int64_t decode_step_work(const Decoder *d) {
    const int64_t D = d->hidden, qkv = (d->heads + 2 * d->kv_heads) * d->head_dim;
    return 3 * D + qkv + d->heads * d->head_dim + 3 * d->inter;
}

static int linear(const Linear *l, const bf16 *x, bf16 *y, int64_t M, int nt) {
    /* a quantized model's batches of amx_rows and more on the AMX tiles, as its Python linears take them */
    if (l->amx && M >= l->amx_rows &&
        ((bf16_gemm_codes_fn)l->amx)(l->kind, l->w, l->scales, (int)l->scales_bf16, x, y, l->bias, M, l->n, l->k,
                                     l->group, nt) == 0)
        return 0;
    switch (l->kind) {
    case BF16:
        ((bf16_gemm_fn)l->fn)(l->w, x, y, l->bias, M, l->n, l->k, nt);
        return 0;
    case BF16W:
        return ((bf16w_gemm_fn)l->fn)(l->w, x, y, l->bias, 1, M, l->n, l->k, nt);
    case INT8:
        return ((int8_gemm_fn)l->fn)(l->w, l->scales, (int)l->scales_bf16, x, y, l->bias, 1, M, l->n, l->k, nt);
    default: /* INT4, INT8G: the same parameters */
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
    const rms_norm_fn norm = (rms_norm_fn)d->rms_norm;
    const rotary_fn rope = (rotary_fn)d->rotary;
    const silu_mul_fn silu = (silu_mul_fn)d->silu_mul;
    const paged_decode_fn attend = (paged_decode_fn)d->paged_decode;
    const bf16 *r = x; /* the residual stream: the embeddings, then res (summed in place) */
    int rc = 0;
    for (int64_t l = 0; l < d->num_layers && rc == 0; l++) {
        const Layer *L = d->layers + l;
        if (l == 0)
            norm(x, NULL, NULL, L->norm1, h, M, D, d->eps, nt);
        else
            norm(y, r, res, L->norm1, h, M, D, d->eps, nt), r = res;
        rc |= linear(&L->qkv, h, qkv, M, nt);
        rope(qkv, QKV, cos, sin, M, Hq + Hkv, Dh, nt);
        rc |= attend(qkv, QKV, qkv + Hq * Dh, QKV, qkv + (Hq + Hkv) * Dh, QKV, L->k_cache, L->v_cache, new_slots,
                     ctx_slots, ctx_stride, ctx_lens, att, M, Hq, Hkv, Dh, nt);
        rc |= linear(&L->o, att, y, M, nt);
        norm(y, r, res, L->norm2, h, M, D, d->eps, nt), r = res;
        rc |= linear(&L->gate, h, gate, M, nt);
        rc |= linear(&L->up, h, up, M, nt);
        silu(gate, I, up, I, act, M, I, nt);
        rc |= linear(&L->down, act, y, M, nt);
    }
    if (rc == 0)
        norm(y, r, res, d->final_norm, out, M, D, d->eps, nt);
    return rc ? -1 : 0;
}
