/* Native CPU paged decode: one query token per sequence, sink + window softmax over a paged pool.
 *
 * Same contract as naive.py (see its docstring); compiled on first use by native.py with
 * -O3 -march=native -fopenmp (OpenMP resolves to the libgomp torch already loaded).
 * One task per (sequence, KV head): walk its block table, prefetching the next block (a head's
 * blocks are scattered over the pool); per block, mask the slots the query may not read and run an
 * online softmax over the G query heads of the group, exponentials vectorised over the block's slots.
 * SIMD path (qk_slots, block_max, pv_block): independent FMA chains for scores and values, and value rows
 * read in chunks of PV_SLOTS by every query head while they are in L1 (not G passes over the whole block).
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
/* Prefetch the row at element offset `off` (D elements, fp32 or bf16) into L2 (hint T1). A block's rows are
 * 64-1024 lines requested at once: prefetches into L1 (T0) wait for its few fill buffers and stall the core
 * (perf: 40% of the kernel's samples on them); into L2 they do not (interleaved A/B: 1.3-1.5x the read rate). */
static inline void prefetch_row(const void *pool, int64_t off, int64_t D, int kv_bf16) {
    const int64_t esize = kv_bf16 ? 2 : 4;
    const char *p = (const char *)pool + off * esize;
    for (int64_t b = 0; b < D * esize; b += 64) __builtin_prefetch(p + b, 0, 2);
}

#ifdef HW_VL
/* dot[t] = q . k[t] for HW_VL slots (row t at element k_off + t * s_slot; 0 where !keep[t], whose rows may hold
 * anything: a freed or unwritten slot is never read). q's NC vectors stay in registers; each row is two
 * independent FMA chains and the rows' chains overlap. NC and BF16 are constants where the caller inlines it. */
static inline __attribute__((always_inline)) void qk_rows(const float *qg, const void *k_pool, int64_t k_off,
                                                          int64_t s_slot, const int NC, const int BF16,
                                                          const unsigned char *keep, hw_vec *dot) {
    hw_vec qc[MAX_D / HW_VL];
    for (int c = 0; c < NC; c++) qc[c] = hw_load(qg + c * HW_VL);
    for (int t = 0; t < HW_VL; t++) {
        hw_vec a = hw_zero(), b = hw_zero();
        if (keep[t]) {
            const int64_t off = k_off + t * s_slot;
            for (int c = 0; c + 1 < NC; c += 2) {
                a = hw_fma(qc[c], hw_load_kv(k_pool, off + c * HW_VL, BF16), a);
                b = hw_fma(qc[c + 1], hw_load_kv(k_pool, off + (c + 1) * HW_VL, BF16), b);
            }
            if (NC % 2) a = hw_fma(qc[NC - 1], hw_load_kv(k_pool, off + (NC - 1) * HW_VL, BF16), a);
        }
        dot[t] = HW_PS(add)(a, b);
    }
}

/* Scores of HW_VL slots for G query heads: out[g * s_stride + t] = q[g] . k[t] (-inf where !keep[t]), the
 * HW_VL sums at once (hw_transpose_sum). Head dims of 4 and 8 vectors and the KV dtype get their own code. */
static inline void qk_slots(const float *q, int64_t q_stride, int64_t G, const void *k_pool, int64_t k_off,
                            int64_t s_slot, int64_t D, int kv_bf16, const unsigned char *keep, float *out,
                            int64_t s_stride) {
    const int nc = (int)(D / HW_VL);
    const hw_mask km = hw_keep_mask(keep);
    for (int64_t g = 0; g < G; g++) {
        const float *qg = q + g * q_stride;
        hw_vec dot[HW_VL];
        if (nc == 4 && !kv_bf16) qk_rows(qg, k_pool, k_off, s_slot, 4, 0, keep, dot);
        else if (nc == 4) qk_rows(qg, k_pool, k_off, s_slot, 4, 1, keep, dot);
        else if (nc == 8 && !kv_bf16) qk_rows(qg, k_pool, k_off, s_slot, 8, 0, keep, dot);
        else if (nc == 8) qk_rows(qg, k_pool, k_off, s_slot, 8, 1, keep, dot);
        else qk_rows(qg, k_pool, k_off, s_slot, nc, kv_bf16, keep, dot);
        hw_store(out + g * s_stride, hw_keep(km, hw_transpose_sum(dot)));
    }
}

/* r[0:TILE] += w * (TILE vectors of the value row at element off). */
static inline __attribute__((always_inline)) void pv_row(hw_vec *r, const int TILE, float w, const void *v_pool,
                                                         int64_t off, int kv_bf16) {
    const hw_vec wt = hw_set1(w);
    for (int u = 0; u < TILE; u++) r[u] = hw_fma(wt, hw_load_kv(v_pool, off + u * HW_VL, kv_bf16), r[u]);
}

/* acc[c0 : c0 + TILE * HW_VL] += sum over kept slots t in [t0, t1) of w[t] * v[t], two accumulator sets
 * (even and odd slots): 2 * TILE independent FMA chains. */
static inline __attribute__((always_inline)) void pv_tile(float *acc, int64_t c0, const int TILE, const float *w,
                                                          const unsigned char *keep, int64_t t0, int64_t t1,
                                                          const void *v_pool, int64_t v_off, int64_t s_slot,
                                                          int kv_bf16) {
    hw_vec r0[4], r1[4];
    for (int u = 0; u < TILE; u++) { r0[u] = hw_load(acc + c0 + u * HW_VL); r1[u] = hw_zero(); }
    int64_t t = t0;
    for (; t + 1 < t1; t += 2) {
        if (keep[t]) pv_row(r0, TILE, w[t], v_pool, v_off + t * s_slot + c0, kv_bf16);
        if (keep[t + 1]) pv_row(r1, TILE, w[t + 1], v_pool, v_off + (t + 1) * s_slot + c0, kv_bf16);
    }
    if (t < t1 && keep[t]) pv_row(r0, TILE, w[t], v_pool, v_off + t * s_slot + c0, kv_bf16);
    for (int u = 0; u < TILE; u++) hw_store(acc + c0 + u * HW_VL, HW_PS(add)(r0[u], r1[u]));
}

/* max(m, x[0..n)) for n % HW_VL == 0: HW_VL running maxima, then the lanes' (a scalar loop is one long
 * chain of dependent maxima). */
static inline float block_max(const float *x, int64_t n, float m) {
    hw_vec v = hw_set1(m);
    for (int64_t t = 0; t < n; t += HW_VL) v = HW_PS(max)(v, hw_load(x + t));
    float lanes[HW_VL];
    hw_store(lanes, v);
    for (int t = 0; t < HW_VL; t++) m = lanes[t] > m ? lanes[t] : m;
    return m;
}

/* Slots the PV loop takes at a time: their value rows stay in L1 while every query head reads them. */
#define PV_SLOTS 16

/* acc[g][0:D] += sum over kept slots t < bs of w[g][t] * v[t] for the G query heads (acc rows MAX_D apart,
 * w rows MAX_BS apart), v row t at element v_off + t * s_slot (D % HW_VL == 0). Slots in chunks of PV_SLOTS,
 * query heads inside: each value row comes from memory once, not once per query head. */
static void pv_block(float *acc, const float *w, int64_t G, const unsigned char *keep, int64_t bs,
                     const void *v_pool, int64_t v_off, int64_t s_slot, int64_t D, int kv_bf16) {
    const int64_t nc = D / HW_VL;
    const int tile = nc % 4 == 0 ? 4 : (nc % 2 == 0 ? 2 : 1);
    for (int64_t t0 = 0; t0 < bs; t0 += PV_SLOTS) {
        const int64_t t1 = t0 + PV_SLOTS < bs ? t0 + PV_SLOTS : bs;
        for (int64_t g = 0; g < G; g++) {
            float *ag = acc + g * MAX_D;
            const float *wg = w + g * MAX_BS;
            for (int64_t c = 0; c < D; c += tile * HW_VL) {
                if (tile == 4) pv_tile(ag, c, 4, wg, keep, t0, t1, v_pool, v_off, s_slot, kv_bf16);
                else if (tile == 2) pv_tile(ag, c, 2, wg, keep, t0, t1, v_pool, v_off, s_slot, kv_bf16);
                else pv_tile(ag, c, 1, wg, keep, t0, t1, v_pool, v_off, s_slot, kv_bf16);
            }
        }
    }
}
#endif

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
                        /* HW_VL slots at a time (qk_slots): per query head HW_VL vectors of partial dot
                         * products, then the HW_VL horizontal sums at once (hw_transpose_sum) */
                        for (int64_t t0 = 0; t0 < bs; t0 += HW_VL) {
                            if (next_off >= 0)
                                for (int t = 0; t < HW_VL; t++) prefetch_row(k_pool, next_off + (t0 + t) * s_slot, D, kv_bf16);
                            qk_slots(&qv[0][0], MAX_D, G, k_pool, blk * s_block + t0 * s_slot + hb * s_head, s_slot, D,
                                     kv_bf16, keep + t0, &s[0][t0], MAX_BS);
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
#ifdef HW_VL
                        if (fast) mx = block_max(s[g], bs, mx);
                        else
#endif
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
                        /* acc[g] += sum_t w[g][t] v[t] (pv_block: independent accumulators per register) */
                        if (next_off >= 0)
                            for (int64_t t = 0; t < bs; t++) prefetch_row(v_pool, next_off + t * s_slot, D, kv_bf16);
                        pv_block(&acc[0][0], &s[0][0], G, keep, bs, v_pool, blk * s_block + hb * s_head, s_slot, D, kv_bf16);
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
