/* Native skinny linear for decode: y[M, O] = x[M, I] @ W[O, I]^T (+ bias) with few rows (M <= 16).
 *
 * A decode step multiplies a handful of token rows by every weight matrix: memory-bound, so each
 * weight must stream from memory once, at full bandwidth. Parallel over output rows (OpenMP, the
 * libgomp torch already loaded); for each W row, 16-float chunks are loaded once and multiplied into
 * M vector accumulators (M is a compile-time constant in each specialisation, so they stay in registers).
 */
#include "native.h"

#define LANES 16

#ifdef __AVX512F__
#include <immintrin.h>
/* AVX-512: one 16-float chunk of the W row is loaded once and FMA'd into M register accumulators. */
#define DEFINE_ROW(M)                                                                                    \
    static inline void row_f32_##M(const float *row, const float *x, int64_t I, float *out) {            \
        __m512 acc[M];                                                                                   \
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                                        \
        int64_t i = 0;                                                                                   \
        for (; i + LANES <= I; i += LANES) {                                                             \
            const __m512 w = _mm512_loadu_ps(row + i);                                                   \
            for (int m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * I + i), acc[m]); \
        }                                                                                                \
        for (int m = 0; m < M; m++) {                                                                    \
            float s = _mm512_reduce_add_ps(acc[m]);                                                      \
            for (int64_t k = i; k < I; k++) s += row[k] * x[m * I + k];                                  \
            out[m] = s;                                                                                  \
        }                                                                                                \
    }                                                                                                    \
    static inline void row_bf16_##M(const uint16_t *row, const float *x, int64_t I, float *out) {        \
        __m512 acc[M];                                                                                   \
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();                                        \
        int64_t i = 0;                                                                                   \
        for (; i + LANES <= I; i += LANES) {                                                             \
            const __m256i h = _mm256_loadu_si256((const __m256i *)(row + i));                             \
            const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));        \
            for (int m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * I + i), acc[m]); \
        }                                                                                                \
        for (int m = 0; m < M; m++) {                                                                    \
            float s = _mm512_reduce_add_ps(acc[m]);                                                      \
            for (int64_t k = i; k < I; k++) s += bf16_to_f32(row[k]) * x[m * I + k];                     \
            out[m] = s;                                                                                  \
        }                                                                                                \
    }
#else
/* Portable: the compiler vectorises each dot product (the W row stays in L1 across the M rows). */
#define DEFINE_ROW(M)                                                                                    \
    static inline void row_f32_##M(const float *row, const float *x, int64_t I, float *out) {            \
        for (int m = 0; m < M; m++) {                                                                    \
            const float *xm = x + m * I;                                                                 \
            float s = 0.f;                                                                               \
            _Pragma("omp simd reduction(+:s)")                                                           \
            for (int64_t i = 0; i < I; i++) s += row[i] * xm[i];                                         \
            out[m] = s;                                                                                  \
        }                                                                                                \
    }                                                                                                    \
    static inline void row_bf16_##M(const uint16_t *row, const float *x, int64_t I, float *out) {        \
        for (int m = 0; m < M; m++) {                                                                    \
            const float *xm = x + m * I;                                                                 \
            float s = 0.f;                                                                               \
            _Pragma("omp simd reduction(+:s)")                                                           \
            for (int64_t i = 0; i < I; i++) s += bf16_to_f32(row[i]) * xm[i];                            \
            out[m] = s;                                                                                  \
        }                                                                                                \
    }
#endif

DEFINE_ROW(1) DEFINE_ROW(2) DEFINE_ROW(3) DEFINE_ROW(4) DEFINE_ROW(5) DEFINE_ROW(6) DEFINE_ROW(7) DEFINE_ROW(8)
DEFINE_ROW(9) DEFINE_ROW(10) DEFINE_ROW(11) DEFINE_ROW(12) DEFINE_ROW(13) DEFINE_ROW(14) DEFINE_ROW(15)
DEFINE_ROW(16)

#define CASE(M)                                                                                          \
    case M:                                                                                              \
        if (w_bf16) row_bf16_##M((const uint16_t *)w + o * I, x, I, out);                               \
        else row_f32_##M((const float *)w + o * I, x, I, out);                                           \
        break;

int skinny_linear(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t I, int64_t O,
                  int w_bf16) {
    if (M < 1 || M > 16) return 1;
    #pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; o++) {
        float out[16];
        switch (M) {
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
            CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
        }
        const float b = bias ? bias[o] : 0.f;
        for (int64_t m = 0; m < M; m++) y[m * O + o] = out[m] + b;
    }
    return 0;
}
