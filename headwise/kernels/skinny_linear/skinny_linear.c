/* Native skinny linear for decode: y[M, O] = x[M, I] @ W[O, I]^T (+ bias) with few rows (M <= 16).
 *
 * A decode step multiplies a handful of token rows by every weight matrix: memory-bound, so each
 * weight must stream from memory once, at full bandwidth. Parallel over output rows (OpenMP, the
 * libgomp torch already loaded); each thread reads its rows as several interleaved streams (one stream
 * per core left bandwidth unused: 9.6 -> 13.2 GB/s on one thread with 4, measured); for each W row,
 * vector-wide chunks are loaded once and multiplied into M vector accumulators (M and the number of
 * streams are compile-time constants in each specialisation, so the accumulators stay in registers).
 * bf16 weights take x rounded to bf16, as a bf16 model's linear takes its input (exact products, fp32
 * accumulation); with AVX512-BF16 they are multiplied in pairs by vdpbf16ps, else widened to fp32.
 */
#include "native.h"

#include <omp.h>
#include <stdlib.h>

#ifdef HW_VL
/* SIMD (native.h's hw_vec: AVX-512 or AVX2): S weight rows at a time (S streams from memory: more reads in
 * flight per core), each HW_VL-float chunk loaded once and FMA'd into M register accumulators per row;
 * x's chunk is loaded once for the S rows. */
/* Bytes ahead in each stream that a software prefetch (into L2) asks for: the hardware prefetcher alone kept
 * too few reads in flight (interleaved A/B, 30 layers of SmolLM2's matrices, 2 threads: 1.05-1.2x). */
#define PF_AHEAD 4096
/* out[j] = the sum of acc[j]'s lanes, j < n: HW_VL of them at once where n is a multiple (hw_transpose_sum), as the
 * lanes of one vector; at 576 inputs a row's 16 scalar reductions cost a quarter of its loop. */
static inline void reduce_sums(const hw_vec *acc, int n, float *out) {
    int j = 0;
    for (; j + HW_VL <= n; j += HW_VL) hw_store(out + j, hw_transpose_sum(acc + j));
    for (; j < n; j++) out[j] = hw_reduce(acc[j]);
}
static inline hw_vec load_w(const float *row, int64_t i) { return hw_load(row + i); }
static inline hw_vec load_w_bf16(const uint16_t *row, int64_t i) { return hw_load_bf16(row + i); }
static inline float tail_w(const float *row, int64_t k) { return row[k]; }
static inline float tail_w_bf16(const uint16_t *row, int64_t k) { return bf16_to_f32(row[k]); }
#define DEFINE_ROWS(S, M, NAME, T, LOAD, TAIL)                                                          \
    static inline void NAME##_##S##_##M(const T *const *rows, const float *x, int64_t I, float *out) {  \
        hw_vec acc[S][M];                                                                                \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++) acc[s][m] = hw_zero();                                           \
        int64_t i = 0;                                                                                   \
        for (; i + HW_VL <= I; i += HW_VL) {                                                             \
            if (((i * (int64_t)sizeof(T)) & 63) == 0) /* a new cache line: ask for the one PF_AHEAD later */ \
                for (int s = 0; s < S; s++) __builtin_prefetch((const char *)(rows[s] + i) + PF_AHEAD, 0, 2);  \
            hw_vec xv[M];                                                                                \
            for (int m = 0; m < M; m++) xv[m] = hw_load(x + m * I + i);                                  \
            for (int s = 0; s < S; s++) {                                                                \
                const hw_vec w = LOAD(rows[s], i);                                                       \
                for (int m = 0; m < M; m++) acc[s][m] = hw_fma(w, xv[m], acc[s][m]);                     \
            }                                                                                            \
        }                                                                                                \
        reduce_sums(&acc[0][0], S * M, out);                                                             \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++)                                                                  \
                for (int64_t k = i; k < I; k++) out[s * M + m] += TAIL(rows[s], k) * x[m * I + k];       \
    }
#else
/* Portable: the compiler vectorises each dot product (a W row stays in L1 across the M rows). */
static inline float load_w(const float *row, int64_t i) { return row[i]; }
static inline float load_w_bf16(const uint16_t *row, int64_t i) { return bf16_to_f32(row[i]); }
#define DEFINE_ROWS(S, M, NAME, T, LOAD, TAIL)                                                          \
    static inline void NAME##_##S##_##M(const T *const *rows, const float *x, int64_t I, float *out) {  \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++) {                                                                \
                const float *xm = x + m * I;                                                             \
                float sum = 0.f;                                                                         \
                _Pragma("omp simd reduction(+:sum)")                                                     \
                for (int64_t i = 0; i < I; i++) sum += LOAD(rows[s], i) * xm[i];                         \
                out[s * M + m] = sum;                                                                    \
            }                                                                                            \
    }
#endif

#define DEFINE_BOTH(S, M) DEFINE_ROWS(S, M, rows_f32, float, load_w, tail_w)                              \
                          DEFINE_ROWS(S, M, rows_bf16, uint16_t, load_w_bf16, tail_w_bf16)
/* Rows per pass and streams, so that S * rows accumulators + rows x chunks stay in the vector registers:
 * AVX-512 (32 registers) takes all M rows in one pass, 4 streams up to 4 rows, 2 up to 8, else 1; AVX2
 * (16 registers) takes at most 4 rows per pass (the next pass reads the same W rows again, from L1),
 * 4 streams up to 2 rows, else 2. */
#if HW_VL == 16
static inline int64_t rows_per_pass(int64_t M) { return M; }
static inline int streams(int64_t M) { return M <= 4 ? 4 : (M <= 8 ? 2 : 1); }
#else
static inline int64_t rows_per_pass(int64_t M) { return M < 4 ? M : 4; }
static inline int streams(int64_t M) { return M <= 2 ? 4 : 2; }
#endif
/* Every (streams, rows) specialisation block_rows dispatches to: X(S, M) for each. */
#define FOR_EACH_SHAPE(X)                                                                                \
    X(4, 1) X(4, 2) X(4, 3) X(4, 4)                                                                      \
    X(2, 1) X(2, 2) X(2, 3) X(2, 4) X(2, 5) X(2, 6) X(2, 7) X(2, 8)                                      \
    X(1, 1) X(1, 2) X(1, 3) X(1, 4) X(1, 5) X(1, 6) X(1, 7) X(1, 8)                                      \
    X(1, 9) X(1, 10) X(1, 11) X(1, 12) X(1, 13) X(1, 14) X(1, 15) X(1, 16)
FOR_EACH_SHAPE(DEFINE_BOTH)

#ifdef __AVX512BF16__
/* bf16 weights with AVX512-BF16: 32 weights a vector, multiplied with x's bf16 pairs by vdpbf16ps into M fp32
 * accumulators per row (half the FMAs of widening, no conversions); xb is x [M, I] rounded to bf16. */
#define HAVE_BF16_DOT 1
#define DEFINE_DOT(S, M)                                                                                \
    static inline void rows_dot_##S##_##M(const uint16_t *const *rows, const uint16_t *xb, int64_t I,    \
                                          float *out) {                                                  \
        __m512 acc[S][M];                                                                                \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++) acc[s][m] = _mm512_setzero_ps();                                 \
        int64_t i = 0;                                                                                   \
        for (; i + 32 <= I; i += 32) {                                                                   \
            for (int s = 0; s < S; s++) __builtin_prefetch((const char *)(rows[s] + i) + PF_AHEAD, 0, 2); \
            __m512bh xv[M];                                                                              \
            for (int m = 0; m < M; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xb + m * I + i);            \
            for (int s = 0; s < S; s++) {                                                                \
                const __m512bh w = (__m512bh)_mm512_loadu_si512(rows[s] + i);                            \
                for (int m = 0; m < M; m++) acc[s][m] = _mm512_dpbf16_ps(acc[s][m], w, xv[m]);           \
            }                                                                                            \
        }                                                                                                \
        reduce_sums(&acc[0][0], S * M, out);                                                             \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++)                                                                  \
                for (int64_t k = i; k < I; k++) out[s * M + m] += bf16_to_f32(rows[s][k]) * bf16_to_f32(xb[m * I + k]); \
    }
FOR_EACH_SHAPE(DEFINE_DOT)
#define BF16_ROWS(S, M) rows_dot_##S##_##M((const uint16_t *const *)rows, (const uint16_t *)x, I, out)
#else
#define HAVE_BF16_DOT 0
#define BF16_ROWS(S, M) rows_bf16_##S##_##M((const uint16_t *const *)rows, (const float *)x, I, out)
#endif

/* x [n] rounded to bf16 (to nearest even; NaN stays a quiet NaN): as bf16 bits into out16 when out16, else as
 * fp32 values into out32. Plain integer code the compiler vectorises. */
static inline uint32_t rounded_bf16_bits(uint32_t v) {
    return (v & 0x7fffffffu) > 0x7f800000u ? (v | 0x400000u) : v + 0x7fffu + ((v >> 16) & 1u);
}
static void round_to_bf16(const float *x, int64_t n, uint16_t *out16, float *out32) {
    const uint32_t *u = (const uint32_t *)x;
    if (out16)
        for (int64_t i = 0; i < n; i++) out16[i] = (uint16_t)(rounded_bf16_bits(u[i]) >> 16);
    else
        for (int64_t i = 0; i < n; i++) ((uint32_t *)out32)[i] = rounded_bf16_bits(u[i]) & 0xffff0000u;
}

/* x is float [M, I] for fp32 weights; for bf16 weights it is x rounded to bf16 (uint16_t with HAVE_BF16_DOT,
 * else float). */
#define CASE(S, M)                                                                                       \
    case M:                                                                                              \
        if (w_bf16) BF16_ROWS(S, M);                                                                     \
        else rows_f32_##S##_##M((const float *const *)rows, (const float *)x, I, out);                   \
        break;

/* Output rows o[0..S) (S = streams(M)) into out[s * M + m]. */
static inline void block_rows(int S, const void *const *rows, const void *x, int64_t I, int64_t M, float *out,
                              int w_bf16) {
    if (S == 4) {
        switch (M) { CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) }
    } else if (S == 2) {
        switch (M) { CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4) CASE(2, 5) CASE(2, 6) CASE(2, 7) CASE(2, 8) }
    } else {
        switch (M) {
            CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(1, 5) CASE(1, 6) CASE(1, 7) CASE(1, 8)
            CASE(1, 9) CASE(1, 10) CASE(1, 11) CASE(1, 12) CASE(1, 13) CASE(1, 14) CASE(1, 15) CASE(1, 16)
        }
    }
}

/* y[M, O] = x[M, I] @ W[O, I]^T (+ bias); returns 0, 1 for M outside [1, 16], 2 (native_build.OUT_OF_MEMORY)
 * when bf16 weights found no memory for the rounded x. Each thread takes a contiguous range of W rows (as a static
 * schedule would) and reads it as S interleaved streams: rows lo + o + s * q for s < S; each group of
 * S rows is multiplied by x's rows in passes of rows_per_pass(M). */
int skinny_linear(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t I, int64_t O,
                  int w_bf16) {
    if (M < 1 || M > 16) return 1;
    const int64_t R = rows_per_pass(M);
    const int S = streams(R);
    const size_t esize = w_bf16 ? 2 : 4;
    /* bf16 weights: x rounded to bf16 once, for every thread */
    void *xr = NULL;
    if (w_bf16) {
        xr = malloc((size_t)(M * I) * (HAVE_BF16_DOT ? 2 : 4));
        if (!xr) return 2;
        round_to_bf16(x, M * I, HAVE_BF16_DOT ? (uint16_t *)xr : NULL, HAVE_BF16_DOT ? NULL : (float *)xr);
    }
    const char *xin = w_bf16 ? (const char *)xr : (const char *)x;
    const size_t xsize = w_bf16 && HAVE_BF16_DOT ? 2 : 4;
    #pragma omp parallel
    {
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lo = O * tid / nt, hi = O * (tid + 1) / nt;
        const int64_t q = (hi - lo) / S;
        const void *rows[4];
        float out[16 * 4];
        for (int64_t o = 0; o < q + (hi - lo - S * q); o++) {
            /* S interleaved rows lo + o + s * q first, then the rows after lo + S * q one at a time */
            const int streams = o < q ? S : 1;
            const int64_t first = o < q ? lo + o : lo + S * q + (o - q), stride = o < q ? q : 0;
            for (int s = 0; s < streams; s++) rows[s] = (const char *)w + (first + s * stride) * I * esize;
            for (int64_t m0 = 0; m0 < M; m0 += R) {
                const int64_t mc = M - m0 < R ? M - m0 : R;
                block_rows(streams, rows, xin + (size_t)(m0 * I) * xsize, I, mc, out, w_bf16);
                for (int s = 0; s < streams; s++) {
                    const int64_t oo = first + s * stride;
                    const float b = bias ? bias[oo] : 0.f;
                    for (int64_t m = 0; m < mc; m++) y[(m0 + m) * O + oo] = out[s * mc + m] + b;
                }
            }
        }
    }
    free(xr);
    return 0;
}
