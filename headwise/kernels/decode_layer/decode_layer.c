/* Native decode layers of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) for a few token rows.
 *
 * A decode step of a small model is mostly per-op overhead when written as torch calls: about 60 small
 * ops per layer on 4-8 rows. This file runs a layer's work in three calls, or many layers in one:
 *
 *   decode_pre   RMSNorm, Q/K/V projections (+ Qwen2 biases), Qwen3's q/k norms, RoPE -> q, k, v
 *   decode_post  O projection + residual, RMSNorm, SiLU-gated MLP + residual (x updated in place)
 *   decode_layers  for layers [first, last): pre, the step's KV written into the paged pool, paged
 *                sink + window attention over it (paged_decode.c), post
 *
 * Activations are fp32 throughout (the residual stream, norms, RoPE, attention); weights and the KV
 * pool are fp32 or bf16 (read converted to fp32, fp32 accumulation). Written keys/values are rounded to
 * bf16 to nearest even: with AVX512-BF16 (vcvtneps2bf16) when the compiler targets it, otherwise in
 * scalar code that gives the same bits. Linears are skinny_linear.c's kernel (each weight streamed once).
 * Contract and reference: naive.py beside this file.
 */
#include <math.h>
#include <time.h>

#include "native.h"
#include "paged_decode/paged_decode.c"
#include "skinny_linear/skinny_linear.c"

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

/* Optional wall-time counters per part (benchmarks/profile_decode_step.py), off unless asked for. */
enum { P_LINEAR, P_ATTENTION, P_KV_WRITE, P_OTHER, NP };
static int prof_on = 0;
static double prof[NP];
static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
#define TIC() (prof_on ? now_s() : 0.0)
#define TOC(t0, part) do { if (prof_on) prof[part] += now_s() - (t0); } while (0)

/* Turn the counters on/off; with `out` (NP doubles: linear, attention, KV writes, the rest), read and reset them. */
void decode_profile(int on, double *out) {
    prof_on = on;
    if (out) for (int i = 0; i < NP; i++) { out[i] = prof[i]; prof[i] = 0.0; }
}

/* Pointers of one layer's weights, in this order in the `weights` array (layer-major, NW per layer). */
enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, B_Q, B_K, B_V, N_IN, N_POST, N_Q, N_K, NW };

/* fp32 -> bf16, round to nearest even (torch's .to(torch.bfloat16)); NaN stays a quiet NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(rounded_bf16_bits(u) >> 16);
}

static void store_row(void *dst, const float *src, int64_t n, int is_bf16) {
    if (!is_bf16) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *out = (uint16_t *)dst;
    int64_t i = 0;
#ifdef __AVX512BF16__
    for (; i + 16 <= n; i += 16) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(out + i), (__m256i)h);
    }
#endif
    for (; i < n; i++) out[i] = f32_to_bf16(src[i]);
}

/* y[n] = w * x / rms(x) over n features (HF's LlamaRMSNorm in fp32). */
static inline void rms_norm(const float *x, const float *w, float *y, int64_t n, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* x [heads, D] rotated in place: x * cos + rotate_half(x) * sin (HF's apply_rotary_pos_emb). */
static inline void rope(float *x, const float *cos, const float *sin, int64_t heads, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *r = x + h * D;
        float tmp[MAX_D];
        for (int64_t d = 0; d < half; d++) tmp[d] = -r[d + half];
        for (int64_t d = half; d < D; d++) tmp[d] = r[d - half];
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) r[d] = r[d] * cos[d] + tmp[d] * sin[d];
    }
}

/* skinny_linear.c's return code: 0, or 2 when it had no memory for bf16-rounded inputs (callers pass it on). */
static int linear(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t I, int64_t O,
                  int w_bf16) {
    const double t0 = TIC();
    const int rc = skinny_linear(x, w, bias, y, M, I, O, w_bf16);
    TOC(t0, P_LINEAR);
    return rc;
}
#define TRY(call) do { const int rc_ = (call); if (rc_ != 0) return rc_; } while (0)

/* Shapes of the decoder, fixed for a model. */
typedef struct {
    int64_t E, H, Hkv, D, F;       /* hidden, query heads, KV heads, head dim, MLP width */
    float eps, qk_eps, scale;       /* RMSNorm epsilons, attention scale */
    int w_bf16;                     /* matrices are bf16 (else fp32); norms and biases are always fp32 */
} Dims;

/* One layer up to attention. x [T, E]; cos/sin [T, D]; h scratch [T, E]; q [T, H*D], k, v [T, Hkv*D]. */
static int pre(const Dims *m, const void *const *w, const float *x, const float *cos, const float *sin, float *h,
               float *q, float *k, float *v, int64_t T) {
    const int64_t E = m->E, H = m->H, Hkv = m->Hkv, D = m->D;
    double t0 = TIC();
    for (int64_t t = 0; t < T; t++) rms_norm(x + t * E, (const float *)w[N_IN], h + t * E, E, m->eps);
    TOC(t0, P_OTHER);
    TRY(linear(h, w[W_Q], (const float *)w[B_Q], q, T, E, H * D, m->w_bf16));
    TRY(linear(h, w[W_K], (const float *)w[B_K], k, T, E, Hkv * D, m->w_bf16));
    TRY(linear(h, w[W_V], (const float *)w[B_V], v, T, E, Hkv * D, m->w_bf16));
    t0 = TIC();
    for (int64_t t = 0; t < T; t++) {
        if (w[N_Q]) for (int64_t hh = 0; hh < H; hh++) rms_norm(q + (t * H + hh) * D, (const float *)w[N_Q], q + (t * H + hh) * D, D, m->qk_eps);
        if (w[N_K]) for (int64_t hh = 0; hh < Hkv; hh++) rms_norm(k + (t * Hkv + hh) * D, (const float *)w[N_K], k + (t * Hkv + hh) * D, D, m->qk_eps);
        rope(q + t * H * D, cos + t * D, sin + t * D, H, D);
        rope(k + t * Hkv * D, cos + t * D, sin + t * D, Hkv, D);
    }
    TOC(t0, P_OTHER);
    return 0;
}

/* One layer after attention. x [T, E] updated; o [T, H*D]; scratch h [T, E], g, u [T, F]. */
static int post(const Dims *m, const void *const *w, float *x, const float *o, float *h, float *g, float *u,
                 int64_t T) {
    const int64_t E = m->E, F = m->F;
    TRY(linear(o, w[W_O], NULL, h, T, m->H * m->D, E, m->w_bf16));
    double t0 = TIC();
    for (int64_t i = 0; i < T * E; i++) x[i] += h[i];
    for (int64_t t = 0; t < T; t++) rms_norm(x + t * E, (const float *)w[N_POST], h + t * E, E, m->eps);
    TOC(t0, P_OTHER);
    TRY(linear(h, w[W_GATE], NULL, g, T, E, F, m->w_bf16));
    TRY(linear(h, w[W_UP], NULL, u, T, E, F, m->w_bf16));
    t0 = TIC();
    #pragma omp simd
    for (int64_t i = 0; i < T * F; i++) g[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
    TOC(t0, P_OTHER);
    TRY(linear(g, w[W_DOWN], NULL, h, T, F, E, m->w_bf16));
    t0 = TIC();
    for (int64_t i = 0; i < T * E; i++) x[i] += h[i];
    TOC(t0, P_OTHER);
    return 0;
}

int decode_pre(const Dims *m, const void *const *w, const float *x, const float *cos, const float *sin, float *h,
               float *q, float *k, float *v, int64_t T) {
    if (T < 1 || T > 16 || m->D > MAX_D || (m->D & 1)) return 1;
    return pre(m, w, x, cos, sin, h, q, k, v, T);
}

int decode_post(const Dims *m, const void *const *w, float *x, const float *o, float *h, float *g, float *u,
                int64_t T) {
    if (T < 1 || T > 16) return 1;
    return post(m, w, x, o, h, g, u, T);
}

/* The paged KV pool and a decode-only step's plan (all of the step's T tokens are decode tokens). */
typedef struct {
    void *k_pool, *v_pool;          /* [P, bs, 1, D] fp32 or bf16, contiguous */
    int64_t *pos_pool;              /* [P, bs] */
    int64_t bs;
    int kv_bf16;
    const int64_t *write_offsets;   /* [L + 1]: layer l writes rows write_offsets[l] .. write_offsets[l+1]-1 */
    const int64_t *write_dst;       /* pool slot (block * bs + slot) of each written row */
    const int64_t *write_src;       /* t * Hkv + h: which key/value row goes there */
    const int64_t *write_pos;       /* its position */
    const int32_t *tables;          /* [L, T, Hkv, M] */
    int64_t M;
    const int64_t *q_pos;           /* [T] */
    const int64_t *sink;            /* [L, Hkv] */
    const int64_t *span;            /* [L, T, Hkv] */
} Pool;

/* Layers [first, last) of a decode-only step. x [T, E] updated in place; scratch: h [T, E],
 * q/o [T, H*D], k, v [T, Hkv*D], g, u [T, F]. `weights` holds NW pointers per layer from layer 0. */
int decode_layers(const Dims *m, const void *const *weights, const Pool *p, float *x, const float *cos,
                  const float *sin, float *h, float *q, float *k, float *v, float *o, float *g, float *u, int64_t T,
                  int64_t first, int64_t last) {
    const int64_t H = m->H, Hkv = m->Hkv, D = m->D;
    if (T < 1 || T > 16 || D > MAX_D || (D & 1) || H / Hkv > MAX_G || p->bs > MAX_BS) return 1;
    const size_t esize = p->kv_bf16 ? 2 : 4;
    for (int64_t l = first; l < last; l++) {
        const void *const *w = weights + l * NW;
        TRY(pre(m, w, x, cos, sin, h, q, k, v, T));
        double t0 = TIC();
        for (int64_t r = p->write_offsets[l]; r < p->write_offsets[l + 1]; r++) {
            const int64_t dst = p->write_dst[r], src = p->write_src[r];
            store_row((char *)p->k_pool + dst * D * esize, k + src * D, D, p->kv_bf16);
            store_row((char *)p->v_pool + dst * D * esize, v + src * D, D, p->kv_bf16);
            p->pos_pool[dst] = p->write_pos[r];
        }
        TOC(t0, P_KV_WRITE);
        t0 = TIC();
        const int rc = paged_decode(q, p->k_pool, p->v_pool, p->pos_pool, p->tables + l * T * Hkv * p->M, p->q_pos,
                                    p->sink + l * Hkv, p->span + l * T * Hkv, o, T, H, Hkv, 1, p->M, p->bs, D,
                                    p->bs * D, D, D, m->scale, p->kv_bf16, 0, -1);
        TOC(t0, P_ATTENTION);
        if (rc != 0) return rc;
        TRY(post(m, w, x, o, h, g, u, T));
    }
    return 0;
}
