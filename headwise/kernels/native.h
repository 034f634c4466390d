/* Helpers shared by headwise's native kernels (included through -I by kernels/native_build.py). */
#ifndef HEADWISE_NATIVE_H
#define HEADWISE_NATIVE_H
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
#endif
