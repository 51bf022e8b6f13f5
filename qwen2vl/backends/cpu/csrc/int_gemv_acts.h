/* What int_gemv.c (AVX-512 VNNI) and int_gemv_avx2.c share: the activation block size, the
 * quantized activations' layout and the weight prefetch. Their outputs equal bit for bit because
 * these, and every float step, are the same. */
#ifndef QWEN2VL_INT_GEMV_ACTS_H
#define QWEN2VL_INT_GEMV_ACTS_H
#include <stdint.h>

#define QK 32 /* activation block along k */
#define MR 4  /* activation rows per pass over a weight block */

/* Quantized activations, interleaved per chunk of mr <= MR rows (the rows that one pass over a
 * weight block reads together), so a pass reads two sequential streams rather than 4 per row
 * (cold 4-row calls of the 1536x8960 shape: int4 341 -> 262 us, int8 415 -> 369 us):
 *   q:   the chunk of rows m0.. starts at m0 * K; 4 k of row r at ((k / 4) * mr + r) * 4
 *   blk: the chunk starts at m0 * K / QK; block b of row r at b * mr + r */
typedef struct {
    float d;    /* block scale */
    float s;    /* float sum of the block's x */
    int32_t sq; /* sum of the block's quantized x */
} Block;

typedef struct {
    int8_t *q;
    Block *blk;
    float *offset; /* per row: 128 * sum_b d_b * qsum_b, the int8 codes' offset in the row's dots */
    int once;      /* M <= MR: each weight block is read in one pass */
} Acts;

static inline int chunk_rows(int64_t M, int64_t m0) { return M - m0 < MR ? (int)(M - m0) : MR; }

/* Weights come from memory, and with the hardware prefetcher alone the compute and the memory
 * reads take turns: each 64-byte line is requested 8 KB ahead. Non-temporal (on AMD) when each weight
 * block is read in one pass (M <= MR); to all cache levels when later passes re-read it. Cold 2B
 * shapes: int4 4-row calls of 1536x8960 288 -> 218 us, one-row calls 5-10% faster, 283-row
 * prefill within 3%. (gcc 12 dropped _mm_prefetch called from this helper: check objdump.) */
#define PREFETCH 8192
static inline void prefetch(const void *p, int once) {
    if (once)
        __builtin_prefetch(p, 0, STREAM_LOCALITY); /* prefetchnta where 0 */
    else
        __builtin_prefetch(p, 0, 3); /* prefetcht0 */
}
#endif
