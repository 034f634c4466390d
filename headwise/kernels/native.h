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
#endif
