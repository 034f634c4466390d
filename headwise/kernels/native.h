/* Helpers shared by headwise's native kernels (included through -I by kernels/native_build.py). */
#ifndef HEADWISE_NATIVE_H
#define HEADWISE_NATIVE_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* bf16 is the top half of an fp32. */
static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Row `off` (in elements) of an fp32 or bf16 array as fp32: in place for fp32, converted into `tmp`. */
static inline const float *row_as_f32(const void *base, int64_t off, int64_t n, int is_bf16, float *tmp) {
    if (!is_bf16) return (const float *)base + off;
    const uint16_t *src = (const uint16_t *)base + off;
    for (int64_t i = 0; i < n; i++) tmp[i] = bf16_to_f32(src[i]);
    return tmp;
}
/* exp(x) in fp32 (Cephes' expf: 2^n * poly(r), |r| <= ln2/2, about 1 ulp), written so that loops over it
 * vectorise; exp(x) = 0 below -87.3 (and for -inf), x above 88.7 is clamped. */
static inline float exp_approx(float x) {
    const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } two_n;
    two_n.u = (uint32_t)((int32_t)n + 127) << 23;
    return x < -87.3f ? 0.f : p * two_n.f;
}

/* One SIMD vector of fp32 for the kernels' fast paths: AVX-512 (16 lanes) where the compiler targets it,
 * else AVX2 + FMA (8 lanes); neither: HW_VL is undefined and the kernels run their portable loops.
 *   hw_load / hw_store / hw_zero / hw_set1 / hw_fma(a, b, c) = a * b + c / hw_reduce (sum of the lanes)
 *   hw_load_kv(base, off, is_bf16): HW_VL values of an fp32 or bf16 array at element `off`, as fp32
 *   hw_transpose_sum(v[HW_VL]): lane t = the sum of v[t]'s lanes
 *   hw_keep_mask(keep[HW_VL]) -> hw_mask; hw_keep(mask, x): x where keep[t], else -inf */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define HW_VL 16
#define HW_PS(op) _mm512_##op##_ps                      /* the ISA's fp32 intrinsic called `op` */
typedef __m512 hw_vec;
typedef __mmask16 hw_mask;
static inline float hw_reduce(hw_vec v) { return _mm512_reduce_add_ps(v); }
static inline hw_vec hw_load_bf16(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline hw_vec hw_pair_sum(hw_vec a, hw_vec b, const int32_t *lo, const int32_t *hi) {
    return _mm512_add_ps(_mm512_permutex2var_ps(a, _mm512_loadu_si512(lo), b),
                         _mm512_permutex2var_ps(a, _mm512_loadu_si512(hi), b));
}
/* 16 horizontal sums in 15 permute pairs (each level halves the lanes a vector spends per input and
 * doubles the inputs it holds). */
static inline hw_vec hw_transpose_sum(const hw_vec *v) {
    static const int32_t L1[2][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
    static const int32_t L2[2][16] = {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                                      {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}};
    static const int32_t L3[2][16] = {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                                      {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}};
    static const int32_t L4[2][16] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                                      {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
    hw_vec a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = hw_pair_sum(v[2 * i], v[2 * i + 1], L1[0], L1[1]);
    for (int i = 0; i < 4; i++) b[i] = hw_pair_sum(a[2 * i], a[2 * i + 1], L2[0], L2[1]);
    for (int i = 0; i < 2; i++) c[i] = hw_pair_sum(b[2 * i], b[2 * i + 1], L3[0], L3[1]);
    return hw_pair_sum(c[0], c[1], L4[0], L4[1]);
}
static inline hw_mask hw_keep_mask(const unsigned char *keep) {
    hw_mask km = 0;
    for (int t = 0; t < 16; t++) km |= (hw_mask)((unsigned)keep[t] << t);
    return km;
}
static inline hw_vec hw_keep(hw_mask km, hw_vec x) { return _mm512_mask_blend_ps(km, _mm512_set1_ps(-INFINITY), x); }
#elif defined(__AVX2__) && defined(__FMA__)
#define HW_VL 8
#define HW_PS(op) _mm256_##op##_ps
typedef __m256 hw_vec;
typedef __m256 hw_mask;
static inline float hw_reduce(hw_vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline hw_vec hw_load_bf16(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/* 8 horizontal sums: three levels of hadd, then the two 128-bit halves added. */
static inline hw_vec hw_transpose_sum(const hw_vec *v) {
    const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}
static inline hw_mask hw_keep_mask(const unsigned char *keep) {
    int32_t bits[8];
    for (int t = 0; t < 8; t++) bits[t] = keep[t] ? -1 : 0;
    return _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)bits));
}
static inline hw_vec hw_keep(hw_mask km, hw_vec x) { return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, km); }
#endif
#ifdef HW_VL
/* The operations whose intrinsics differ only by the ISA's prefix, written once. */
static inline hw_vec hw_load(const float *p) { return HW_PS(loadu)(p); }
static inline void hw_store(float *p, hw_vec v) { HW_PS(storeu)(p, v); }
static inline hw_vec hw_zero(void) { return HW_PS(setzero)(); }
static inline hw_vec hw_set1(float x) { return HW_PS(set1)(x); }
static inline hw_vec hw_fma(hw_vec a, hw_vec b, hw_vec c) { return HW_PS(fmadd)(a, b, c); }
static inline hw_vec hw_load_kv(const void *base, int64_t off, int is_bf16) {
    return is_bf16 ? hw_load_bf16((const uint16_t *)base + off) : hw_load((const float *)base + off);
}
#endif
#endif
