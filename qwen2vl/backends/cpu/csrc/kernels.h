/* Every C function and struct the Python side uses, declared once.
 *
 * Each kernel source includes this header, so the compiler checks its definitions against these
 * prototypes, and qwen2vl/backends/cpu/native.py reads this file to set the ctypes argument types
 * and to build the decode step's structs: the C and Python sides can't drift apart.
 * Keep it to what native.py parses: `typedef uint16_t bf16;`, prototypes of functions returning
 * void, int or int64_t whose parameters are pointers, int64_t, int or float, and typedef'd structs
 * whose fields are those types, pointers or earlier structs. */
#ifndef QWEN2VL_KERNELS_H
#define QWEN2VL_KERNELS_H
#include <stdint.h>

typedef uint16_t bf16;

/* The prefetch locality (gcc's 0-3) of weights a kernel pass reads once: native.py sets it per CPU
 * vendor (isa.Isa.stream_locality; 0, prefetchnta, where unset): an Intel Xeon streamed at 10 of its
 * 25 GB/s with prefetchnta. */
#ifndef STREAM_LOCALITY
#define STREAM_LOCALITY 0
#endif

/* pack.c: w [n, words] 32-bit words -> [ceil(n/16), words, 16], rows past n zero (the kernels' layout). */
void pack_rows16(const uint32_t *w, uint32_t *out, int64_t n, int64_t words, int nthreads);
/* pack.c: w [n, k] bf16 or fp32 quantized per row (symmetric int8, as backends/quant.py's Int8Linear)
 * -> pack_int8's codes [ceil(n/16), k/4, 16, 4] and scales [ceil(n/16) * 16] in w's dtype. k % 4 == 0. */
void quantize_int8(const void *w, int w_bf16, uint8_t *codes, void *scales, int64_t n, int64_t k, int nthreads);

/* bf16_gemm.c: y [M, N] = x [M, K] @ W.T + bias, W packed by pack_bf16, bf16 in and out. */
void bf16_gemm(const bf16 *w, const bf16 *x, bf16 *y, const bf16 *bias, int64_t M, int64_t N, int64_t K,
               int nthreads);
/* Its AMX tiles for prefill rows (the amx variant only; 0 elsewhere): 1 asks Linux for the tile state and
 * switches them on, 0 switches them off, -1 asks whether they are on. 1 when on. */
int bf16_gemm_amx(int enable);
/* Its AMX tiles on int_gemv's weights (kind INT8, INT4 or INT8G, layouts and scales as int8_gemm / int4_gemm /
 * int8g_gemm below) for a quantized model's prefill rows and large decode batches, the codes widened to bf16
 * (amx_codes.h). -1, with nothing to keep, where the tiles are off (and in every other build) or out of memory. */
int bf16_gemm_codes(int64_t kind, const uint8_t *w, const void *sz, int sz_bf16, const bf16 *x, bf16 *y,
                    const bf16 *bias, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads);

/* bf16w_gemm.c: the same with fp32 arithmetic (CPUs without AVX-512 BF16); x and y bf16 or fp32
 * (io_bf16), bias bf16 or NULL. 0, or -1 when out of memory. */
int bf16w_gemm(const bf16 *w, const void *x, void *y, const bf16 *bias, int io_bf16, int64_t M, int64_t N, int64_t K,
               int nthreads);

/* int_gemv.c (int_gemv_avx2.c without AVX-512): int8 / int4 weights (pack_int8 / pack_int4 layouts) times activations quantized on
 * the fly; x, y, bias bf16 or fp32 (io_bf16). 0, or -1 when out of memory. int8_gemm: a scale per row;
 * int4_gemm and int8g_gemm (8-bit codes in groups, GPTQ-Int8's): a scale and a zero per group (pack_groups). */
int int8_gemm(const uint8_t *w, const void *scales, int scales_bf16, const void *x, void *y, const void *bias,
              int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads);
int int4_gemm(const uint8_t *w, const void *scales_zeros, int scales_bf16, const void *x, void *y, const void *bias,
              int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads);
int int8g_gemm(const uint8_t *w, const void *scales_zeros, int scales_bf16, const void *x, void *y, const void *bias,
               int io_bf16, int64_t M, int64_t N, int64_t K, int64_t group, int nthreads);

/* int8_mm.c: pack_int8 weights times x quantized to int8 per row (prefill, vision): exact int32 dots, a row's
 * output independent of the rows beside it. x, y, bias bf16 or fp32 (io_bf16). 0, or -1 when out of memory. */
int int8_mm(const uint8_t *w, const void *scales, int scales_bf16, const void *x, void *y, const void *bias,
            int io_bf16, int64_t M, int64_t N, int64_t K, int nthreads);
/* Its AMX tiles (the amx variant only; 0 elsewhere): 1 asks Linux for the tile state and switches them on, 0
 * off, -1 asks. 1 when on. The same bits as the VNNI tile. */
int int8_mm_amx(int enable);

/* layer_ops.c: a decoder layer's small ops on bf16 rows. */
void rms_norm(const bf16 *x, const bf16 *res, bf16 *sum_out, const bf16 *w, bf16 *out, int64_t N, int64_t D,
              float eps, int nthreads);
void rotary(bf16 *qk, int64_t stride, const bf16 *cos, const bf16 *sin, int64_t N, int64_t H, int64_t D,
            int nthreads);
void silu_mul(const bf16 *g, int64_t g_stride, const bf16 *u, int64_t u_stride, bf16 *out, int64_t N, int64_t I,
              int nthreads);

/* top_k.c: the k largest values of each float32 row x [rows, n] (row stride `stride`), best first, and
 * their columns; maxima is scratch of rows * ceil(n / 128) floats. Needs k <= ceil(n / 128); no NaN. */
void top_k_rows(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t k, float *values,
                int64_t *columns, float *maxima, int nthreads);

/* paged_decode.c: write the new tokens' k/v to the paged cache, then attend. 0, or -1 when out of memory. */
int paged_decode(const bf16 *q, int64_t q_stride, const bf16 *k, int64_t k_stride, const bf16 *v, int64_t v_stride,
                 bf16 *k_cache, bf16 *v_cache, const int64_t *new_slots, const int64_t *ctx_slots, int64_t ctx_stride,
                 const int64_t *ctx_lens, bf16 *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int nthreads);

/* vision_ops.c: the vision tower's elementwise ops, in place on bf16 ... */
void quick_gelu(bf16 *x, int64_t n, int nthreads);
void vision_rotary(bf16 *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                   int nthreads);
void softmax_rows(bf16 *x, int64_t R, int64_t n, int lanes, int nthreads);
/* ... and on fp32 (softmax_rows_f32: n % lanes == 0) */
void quick_gelu_f32(float *x, int64_t n, int nthreads);
void vision_rotary_f32(float *qkv, int64_t stride, const float *cos, const float *sin, int64_t N, int64_t H, int64_t D,
                       int nthreads);
void softmax_rows_f32(float *x, int64_t R, int64_t n, int lanes, int nthreads);

/* decode_step.c: a whole decode step, calling the kernels above through these pointers. */
enum { BF16 = 0, INT8 = 1, INT4 = 2, BF16W = 3, INT8G = 4 }; /* also int_gemv's weight kinds */

/* One linear: y [M, n] = x [M, k] @ W.T + bias, W in its kernel's packed layout. */
typedef struct {
    int64_t kind;                  /* BF16, INT8, INT4, BF16W or INT8G */
    const void *fn;                /* bf16_gemm, int8_gemm, int4_gemm, bf16w_gemm or int8g_gemm */
    const void *w, *scales, *bias; /* scales: per row (INT8) or scales|zeros per group (INT4, INT8G); bias bf16 or NULL */
    int64_t scales_bf16, n, k, group;
    const void *amx;  /* INT8, INT4, INT8G: bf16_gemm_codes where the AMX tiles are on, else NULL ... */
    int64_t amx_rows; /* ... which takes calls of this many rows and more (gemm.AMX_CODES_ROWS) */
} Linear;

typedef struct {
    const bf16 *norm1, *norm2; /* input_layernorm, post_attention_layernorm weights */
    bf16 *k_cache, *v_cache;   /* this layer's [num_slots, Hkv, Dh] */
    Linear qkv, o, gate, up, down;
} Layer;

typedef struct {
    const void *rms_norm, *rotary, *silu_mul, *paged_decode; /* the functions of the same names */
    int64_t num_layers, hidden, inter, heads, kv_heads, head_dim;
    float eps;
    const bf16 *final_norm;
    const Layer *layers;
} Decoder;

int64_t decode_step_work(const Decoder *d);
int decode_step(const Decoder *d, const bf16 *x, bf16 *out, const bf16 *cos, const bf16 *sin,
                const int64_t *new_slots, const int64_t *ctx_slots, int64_t ctx_stride, const int64_t *ctx_lens,
                int64_t M, bf16 *work, int nthreads);

#endif
