/* Native CPU paged decode: one query token per sequence, sink + window softmax over a paged pool.
 *
 * Same contract as naive.py (see its docstring); compiled on first use by native.py with
 * -O3 -march=native -fopenmp (OpenMP resolves to the libgomp torch already loaded).
 * One task per (sequence, KV head): walk its block table, prefetching the next block (a head's
 * blocks are scattered over the pool); per block, mask the slots the query may not read and run an
 * online softmax over the G query heads of the group, exponentials vectorised over the block's slots.
 * Reads each kept key and value once, never copies pages.
 */
#include <math.h>

#include "native.h"

#define MAX_G 16
#define MAX_D 256
#define MAX_BS 512  /* vLLM's split KV parts use 384-slot blocks (integrations/vllm/split.py) */

#ifdef __AVX512F__
#include <immintrin.h>
/* 16 fp32 values of a row at element offset `off` (fp32, or bf16 widened: bf16 is fp32's top half). */
static inline __m512 load16_kv(const void *base, int64_t off, int kv_bf16) {
    if (!kv_bf16) return _mm512_loadu_ps((const float *)base + off);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 pair_sum(__m512 a, __m512 b, const int32_t *lo, const int32_t *hi) {
    return _mm512_add_ps(_mm512_permutex2var_ps(a, _mm512_loadu_si512(lo), b),
                         _mm512_permutex2var_ps(a, _mm512_loadu_si512(hi), b));
}
/* Lane t of the result = the sum of the 16 lanes of v[t]: 16 horizontal sums in 15 permute pairs
 * (each level halves the lanes a vector spends per slot and doubles the slots it holds). */
static inline __m512 transpose_sum16(const __m512 *v) {
    static const int32_t L1[2][16] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                                      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
    static const int32_t L2[2][16] = {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                                      {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}};
    static const int32_t L3[2][16] = {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                                      {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}};
    static const int32_t L4[2][16] = {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                                      {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = pair_sum(v[2 * i], v[2 * i + 1], L1[0], L1[1]);
    for (int i = 0; i < 4; i++) b[i] = pair_sum(a[2 * i], a[2 * i + 1], L2[0], L2[1]);
    for (int i = 0; i < 2; i++) c[i] = pair_sum(b[2 * i], b[2 * i + 1], L3[0], L3[1]);
    return pair_sum(c[0], c[1], L4[0], L4[1]);
}
#endif

/* q [B, H, D] f32; k_pool/v_pool [P, bs, Hb, D] (f32 if kv_bf16 == 0 else bf16) with element strides
 * (s_block, s_slot, s_head, 1), the same for both pools (vLLM's cache is such a strided view); pos_pool
 * [P, bs] i64; tables [B, Ht, M] i32 (Hkv = Ht * Hb); q_pos [B] i64; sink [Hkv] i64; span [B, Hkv] i64;
 * out [B, H, D] f32. */
/* Prefetch the row at element offset `off` (D elements, fp32 or bf16) into cache. */
static inline void prefetch_row(const void *pool, int64_t off, int64_t D, int kv_bf16) {
    const int64_t esize = kv_bf16 ? 2 : 4;
    const char *p = (const char *)pool + off * esize;
    for (int64_t b = 0; b < D * esize; b += 64) __builtin_prefetch(p + b);
}

int paged_decode(const float *q, const void *k_pool, const void *v_pool, const int64_t *pos_pool,
                 const int32_t *tables, const int64_t *q_pos, const int64_t *sink, const int64_t *span,
                 float *out, int64_t B, int64_t H, int64_t Hkv, int64_t Hb, int64_t M, int64_t bs, int64_t D,
                 int64_t s_block, int64_t s_slot, int64_t s_head, float scale, int kv_bf16) {
    const int64_t G = H / Hkv;
    const int64_t Ht = Hkv / Hb;
    if (G > MAX_G || D > MAX_D || bs > MAX_BS) return 1;
    /* whole 16-slot and 16-float vectors: the AVX-512 path (the loops below otherwise) */
    const int fast = D % 16 == 0 && bs % 16 == 0;
    (void)fast;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hkv; h++) {
            float qv[MAX_G][MAX_D], acc[MAX_G][MAX_D], m[MAX_G], l[MAX_G], s[MAX_G][MAX_BS];
            float kf[MAX_D];
            unsigned char keep[MAX_BS];
            const int64_t qp = q_pos[b];
            const int64_t sk = sink[h];
            const int64_t lo = qp - span[b * Hkv + h];       /* window: p > lo */
            const int32_t *table = tables + (b * Ht + h / Hb) * M;
            const int64_t hb = h % Hb;
            for (int64_t g = 0; g < G; g++) {
                const float *src = q + (b * H + h * G + g) * D;
                for (int64_t d = 0; d < D; d++) { qv[g][d] = src[d] * scale; acc[g][d] = 0.f; }
                m[g] = -INFINITY;
                l[g] = 0.f;
            }
            if (qp >= 0) {
                for (int64_t j = 0; j < M; j++) {
                    const int64_t blk = table[j];
                    if (blk < 0) continue;
                    /* a head's blocks are scattered over the pool and the hardware prefetcher stops at
                     * page ends: while this block runs, fetch the next block's rows, one row per slot */
                    int64_t next = -1;
                    for (int64_t jn = j + 1; jn < M && jn <= j + 4 && next < 0; jn++) next = table[jn];
                    const int64_t next_off = next < 0 ? -1 : next * s_block + hb * s_head;
                    if (next >= 0) __builtin_prefetch(pos_pool + next * bs);
                    const int64_t *bp = pos_pool + blk * bs;
                    int64_t n = 0;
                    for (int64_t t = 0; t < bs; t++) {
                        const int64_t p = bp[t];
                        keep[t] = p >= 0 && p <= qp && (p < sk || p > lo);
                        n += keep[t];
                    }
                    if (n == 0) continue;
#ifdef __AVX512F__
                    if (fast) {
                        /* 16 slots at a time: per slot and query head one vector of D/16-way partial dot
                         * products, then the 16 horizontal sums at once (transpose_sum16) */
                        for (int64_t t0 = 0; t0 < bs; t0 += 16) {
                            __mmask16 km = 0;
                            for (int t = 0; t < 16; t++) km |= (__mmask16)((unsigned)keep[t0 + t] << t);
                            if (next_off >= 0)
                                for (int t = 0; t < 16; t++) prefetch_row(k_pool, next_off + (t0 + t) * s_slot, D, kv_bf16);
                            for (int64_t g = 0; g < G; g++) {
                                __m512 part[16];
                                for (int t = 0; t < 16; t++) {
                                    __m512 dot = _mm512_setzero_ps();
                                    if (km >> t & 1) {
                                        const int64_t off = blk * s_block + (t0 + t) * s_slot + hb * s_head;
                                        for (int64_t c = 0; c < D; c += 16)
                                            dot = _mm512_fmadd_ps(_mm512_loadu_ps(qv[g] + c), load16_kv(k_pool, off + c, kv_bf16), dot);
                                    }
                                    part[t] = dot;
                                }
                                const __m512 sc = _mm512_mask_blend_ps(km, _mm512_set1_ps(-INFINITY), transpose_sum16(part));
                                _mm512_storeu_ps(s[g] + t0, sc);
                            }
                        }
                    } else
#endif
                    /* scores [G, bs]: slots this query may not read score -inf (weight 0 below) */
                    for (int64_t t = 0; t < bs; t++) {
                        if (next_off >= 0) prefetch_row(k_pool, next_off + t * s_slot, D, kv_bf16);
                        if (!keep[t]) {
                            for (int64_t g = 0; g < G; g++) s[g][t] = -INFINITY;
                            continue;
                        }
                        const float *kp = row_as_f32(k_pool, blk * s_block + t * s_slot + hb * s_head, D, kv_bf16, kf);
                        for (int64_t g = 0; g < G; g++) {
                            float dot = 0.f;
                            #pragma omp simd reduction(+:dot)
                            for (int64_t d = 0; d < D; d++) dot += qv[g][d] * kp[d];
                            s[g][t] = dot;
                        }
                    }
                    /* online softmax over the block, exponentials vectorised over its slots */
                    for (int64_t g = 0; g < G; g++) {
                        float mx = m[g];
                        for (int64_t t = 0; t < bs; t++) mx = s[g][t] > mx ? s[g][t] : mx;
                        float sum = 0.f;
                        #pragma omp simd reduction(+:sum)
                        for (int64_t t = 0; t < bs; t++) {
                            const float e = s[g][t] == -INFINITY ? 0.f : exp_approx(s[g][t] - mx);
                            s[g][t] = e;
                            sum += e;
                        }
                        if (mx != m[g]) {
                            const float corr = exp_approx(m[g] - mx);   /* m = -inf the first time: corr = 0 */
                            l[g] *= corr;
                            #pragma omp simd
                            for (int64_t d = 0; d < D; d++) acc[g][d] *= corr;
                            m[g] = mx;
                        }
                        l[g] += sum;
                    }
#ifdef __AVX512F__
                    if (fast) {
                        /* acc[g] += sum_t w[g][t] v[t]: each 16-float slice of acc stays in a register over
                         * the block's slots */
                        if (next_off >= 0)
                            for (int64_t t = 0; t < bs; t++) prefetch_row(v_pool, next_off + t * s_slot, D, kv_bf16);
                        for (int64_t g = 0; g < G; g++) {
                            for (int64_t c = 0; c < D; c += 16) {
                                __m512 r = _mm512_loadu_ps(acc[g] + c);
                                for (int64_t t = 0; t < bs; t++) {
                                    if (!keep[t]) continue;
                                    const int64_t off = blk * s_block + t * s_slot + hb * s_head;
                                    r = _mm512_fmadd_ps(_mm512_set1_ps(s[g][t]), load16_kv(v_pool, off + c, kv_bf16), r);
                                }
                                _mm512_storeu_ps(acc[g] + c, r);
                            }
                        }
                        continue;
                    }
#endif
                    for (int64_t t = 0; t < bs; t++) {
                        if (next_off >= 0) prefetch_row(v_pool, next_off + t * s_slot, D, kv_bf16);
                        if (!keep[t]) continue;
                        const float *vp = row_as_f32(v_pool, blk * s_block + t * s_slot + hb * s_head, D, kv_bf16, kf);
                        for (int64_t g = 0; g < G; g++) {
                            const float w = s[g][t];
                            #pragma omp simd
                            for (int64_t d = 0; d < D; d++) acc[g][d] += w * vp[d];
                        }
                    }
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float *dst = out + (b * H + h * G + g) * D;
                const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
                for (int64_t d = 0; d < D; d++) dst[d] = acc[g][d] * inv;
            }
        }
    }
    return 0;
}
