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

/* q [B, H, D] f32; k_pool/v_pool [P, bs, Hb, D] (f32 if kv_bf16 == 0 else bf16) with element strides
 * (s_block, s_slot, s_head, 1), the same for both pools (vLLM's cache is such a strided view); pos_pool
 * [P, bs] i64; tables [B, Ht, M] i32 (Hkv = Ht * Hb); q_pos [B] i64; sink [Hkv] i64; span [B, Hkv] i64;
 * out [B, H, D] f32.
 * logical != 0: tables [B, M] hold each sequence's blocks in position order (Ht = 1, Hb = Hkv: vLLM's
 * block table), slot t of entry j holds position j * bs + t, pos_pool is not read; each head visits only
 * its sink entries and the entries of its window, and skips entries equal to null_block. */
/* Prefetch the row at element offset `off` (D elements, fp32 or bf16) into cache. */
static inline void prefetch_row(const void *pool, int64_t off, int64_t D, int kv_bf16) {
    const int64_t esize = kv_bf16 ? 2 : 4;
    const char *p = (const char *)pool + off * esize;
    for (int64_t b = 0; b < D * esize; b += 64) __builtin_prefetch(p + b);
}

int paged_decode(const float *q, const void *k_pool, const void *v_pool, const int64_t *pos_pool,
                 const int32_t *tables, const int64_t *q_pos, const int64_t *sink, const int64_t *span,
                 float *out, int64_t B, int64_t H, int64_t Hkv, int64_t Hb, int64_t M, int64_t bs, int64_t D,
                 int64_t s_block, int64_t s_slot, int64_t s_head, float scale, int kv_bf16, int logical,
                 int64_t null_block) {
    const int64_t G = H / Hkv;
    const int64_t Ht = Hkv / Hb;
    if (G > MAX_G || D > MAX_D || bs > MAX_BS || (logical && Ht != 1)) return 1;
    /* whole vectors of slots and features: the SIMD path (native.h's HW_VL; the loops below otherwise) */
#ifdef HW_VL
    const int fast = D % HW_VL == 0 && bs % HW_VL == 0;
#endif
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
            /* logical tables: entries [0, sink_end) hold the sink, [win_first, win_last] the window */
            const int64_t sink_end = (sk + bs - 1) / bs;
            const int64_t win_first = (lo + 1 > 0 ? lo + 1 : 0) / bs, win_last = qp / bs;
#define HW_SKIP(j) (logical && (((j) >= sink_end && (j) < win_first) || (j) > win_last))
            for (int64_t g = 0; g < G; g++) {
                const float *src = q + (b * H + h * G + g) * D;
                for (int64_t d = 0; d < D; d++) { qv[g][d] = src[d] * scale; acc[g][d] = 0.f; }
                m[g] = -INFINITY;
                l[g] = 0.f;
            }
            if (qp >= 0) {
                const int64_t j_end = logical && win_last + 1 < M ? win_last + 1 : M;
                for (int64_t j = 0; j < j_end; j++) {
                    if (HW_SKIP(j)) { if (j < win_first) j = win_first - 1; continue; }
                    const int64_t blk = table[j];
                    if (blk < 0 || (logical && blk == null_block)) continue;
                    /* a head's blocks are scattered over the pool and the hardware prefetcher stops at
                     * page ends: while this block runs, fetch the next block's rows, one row per slot */
                    int64_t next = -1;
                    for (int64_t jn = j + 1; jn < j_end && jn <= j + 4 && next < 0; jn++)
                        if (!HW_SKIP(jn)) next = table[jn];
                    const int64_t next_off = next < 0 ? -1 : next * s_block + hb * s_head;
                    if (next >= 0 && !logical) __builtin_prefetch(pos_pool + next * bs);
                    const int64_t *bp = logical ? NULL : pos_pool + blk * bs;
                    int64_t n = 0;
                    for (int64_t t = 0; t < bs; t++) {
                        const int64_t p = logical ? j * bs + t : bp[t];
                        keep[t] = p >= 0 && p <= qp && (p < sk || p > lo);
                        n += keep[t];
                    }
                    if (n == 0) continue;
#ifdef HW_VL
                    if (fast) {
                        /* HW_VL slots at a time: per slot and query head one vector of partial dot products,
                         * then the HW_VL horizontal sums at once (hw_transpose_sum) */
                        for (int64_t t0 = 0; t0 < bs; t0 += HW_VL) {
                            const hw_mask km = hw_keep_mask(keep + t0);
                            if (next_off >= 0)
                                for (int t = 0; t < HW_VL; t++) prefetch_row(k_pool, next_off + (t0 + t) * s_slot, D, kv_bf16);
                            for (int64_t g = 0; g < G; g++) {
                                hw_vec part[HW_VL];
                                for (int t = 0; t < HW_VL; t++) {
                                    hw_vec dot = hw_zero();
                                    if (keep[t0 + t]) {
                                        const int64_t off = blk * s_block + (t0 + t) * s_slot + hb * s_head;
                                        for (int64_t c = 0; c < D; c += HW_VL)
                                            dot = hw_fma(hw_load(qv[g] + c), hw_load_kv(k_pool, off + c, kv_bf16), dot);
                                    }
                                    part[t] = dot;
                                }
                                hw_store(s[g] + t0, hw_keep(km, hw_transpose_sum(part)));
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
#ifdef HW_VL
                    if (fast) {
                        /* acc[g] += sum_t w[g][t] v[t]: each HW_VL-float slice of acc stays in a register over
                         * the block's slots */
                        if (next_off >= 0)
                            for (int64_t t = 0; t < bs; t++) prefetch_row(v_pool, next_off + t * s_slot, D, kv_bf16);
                        for (int64_t g = 0; g < G; g++) {
                            for (int64_t c = 0; c < D; c += HW_VL) {
                                hw_vec r = hw_load(acc[g] + c);
                                for (int64_t t = 0; t < bs; t++) {
                                    if (!keep[t]) continue;
                                    const int64_t off = blk * s_block + t * s_slot + hb * s_head;
                                    r = hw_fma(hw_set1(s[g][t]), hw_load_kv(v_pool, off + c, kv_bf16), r);
                                }
                                hw_store(acc[g] + c, r);
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
#undef HW_SKIP
