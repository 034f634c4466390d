/* Native skinny linear for decode: y[M, O] = x[M, I] @ W[O, I]^T (+ bias) with few rows (M <= 16).
 *
 * A decode step multiplies a handful of token rows by every weight matrix: memory-bound, so each
 * weight must stream from memory once, at full bandwidth. Parallel over output rows (OpenMP, the
 * libgomp torch already loaded); each thread reads its rows as several interleaved streams (one stream
 * per core left bandwidth unused: 9.6 -> 13.2 GB/s on one thread with 4, measured); for each W row,
 * 16-float chunks are loaded once and multiplied into M vector accumulators (M and the number of
 * streams are compile-time constants in each specialisation, so the accumulators stay in registers).
 */
#include "native.h"

#define LANES 16

#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
/* AVX-512: S weight rows at a time (S streams from memory: more reads in flight per core), each
 * 16-float chunk loaded once and FMA'd into M register accumulators per row; x's chunk is loaded once
 * for the S rows. */
static inline __m512 load_w(const float *row, int64_t i) { return _mm512_loadu_ps(row + i); }
static inline __m512 load_w_bf16(const uint16_t *row, int64_t i) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)(row + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline float tail_w(const float *row, int64_t k) { return row[k]; }
static inline float tail_w_bf16(const uint16_t *row, int64_t k) { return bf16_to_f32(row[k]); }
#define DEFINE_ROWS(S, M, NAME, T, LOAD, TAIL)                                                          \
    static inline void NAME##_##S##_##M(const T *const *rows, const float *x, int64_t I, float *out) {  \
        __m512 acc[S][M];                                                                                \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++) acc[s][m] = _mm512_setzero_ps();                                 \
        int64_t i = 0;                                                                                   \
        for (; i + LANES <= I; i += LANES) {                                                             \
            __m512 xv[M];                                                                                \
            for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_ps(x + m * I + i);                          \
            for (int s = 0; s < S; s++) {                                                                \
                const __m512 w = LOAD(rows[s], i);                                                       \
                for (int m = 0; m < M; m++) acc[s][m] = _mm512_fmadd_ps(w, xv[m], acc[s][m]);            \
            }                                                                                            \
        }                                                                                                \
        for (int s = 0; s < S; s++)                                                                      \
            for (int m = 0; m < M; m++) {                                                                \
                float sum = _mm512_reduce_add_ps(acc[s][m]);                                             \
                for (int64_t k = i; k < I; k++) sum += TAIL(rows[s], k) * x[m * I + k];                  \
                out[s * M + m] = sum;                                                                    \
            }                                                                                            \
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
/* S streams: 4 up to 4 rows, 2 up to 8 (S * M accumulators stay in the 32 vector registers), else 1 */
DEFINE_BOTH(4, 1) DEFINE_BOTH(4, 2) DEFINE_BOTH(4, 3) DEFINE_BOTH(4, 4)
DEFINE_BOTH(2, 5) DEFINE_BOTH(2, 6) DEFINE_BOTH(2, 7) DEFINE_BOTH(2, 8)
DEFINE_BOTH(1, 1) DEFINE_BOTH(1, 2) DEFINE_BOTH(1, 3) DEFINE_BOTH(1, 4) DEFINE_BOTH(1, 5) DEFINE_BOTH(1, 6)
DEFINE_BOTH(1, 7) DEFINE_BOTH(1, 8) DEFINE_BOTH(1, 9) DEFINE_BOTH(1, 10) DEFINE_BOTH(1, 11) DEFINE_BOTH(1, 12)
DEFINE_BOTH(1, 13) DEFINE_BOTH(1, 14) DEFINE_BOTH(1, 15) DEFINE_BOTH(1, 16)

#define CASE(S, M)                                                                                       \
    case M:                                                                                              \
        if (w_bf16) rows_bf16_##S##_##M((const uint16_t *const *)rows, x, I, out);                       \
        else rows_f32_##S##_##M((const float *const *)rows, x, I, out);                                  \
        break;

/* Output rows o[0..S) (S = streams(M)) into out[s * M + m]. */
static inline void block_rows(int S, const void *const *rows, const float *x, int64_t I, int64_t M, float *out,
                              int w_bf16) {
    if (S == 4) {
        switch (M) { CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4) }
    } else if (S == 2) {
        switch (M) { CASE(2, 5) CASE(2, 6) CASE(2, 7) CASE(2, 8) }
    } else {
        switch (M) {
            CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(1, 5) CASE(1, 6) CASE(1, 7) CASE(1, 8)
            CASE(1, 9) CASE(1, 10) CASE(1, 11) CASE(1, 12) CASE(1, 13) CASE(1, 14) CASE(1, 15) CASE(1, 16)
        }
    }
}

/* y[M, O] = x[M, I] @ W[O, I]^T (+ bias). Each thread takes a contiguous range of W rows (as a static
 * schedule would) and reads it as S interleaved streams: rows lo + o + s * q for s < S. */
int skinny_linear(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t I, int64_t O,
                  int w_bf16) {
    if (M < 1 || M > 16) return 1;
    const int S = M <= 4 ? 4 : (M <= 8 ? 2 : 1);
    const size_t esize = w_bf16 ? 2 : 4;
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
            block_rows(streams, rows, x, I, M, out, w_bf16);
            for (int s = 0; s < streams; s++) {
                const int64_t oo = first + s * stride;
                const float b = bias ? bias[oo] : 0.f;
                for (int64_t m = 0; m < M; m++) y[m * O + oo] = out[s * M + m] + b;
            }
        }
    }
    return 0;
}
