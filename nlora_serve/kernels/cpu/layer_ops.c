/* The decoder layer's elementwise ops in one pass each, for the CPU.
 *
 * torch runs each of these as 3-6 separate ops over the whole [T, hidden] tensor (F.rms_norm
 * decomposes into pow, mean, add, rsqrt, mul, mul; RoPE is cat, mul, addcmul, cast; the MLP's
 * SiLU(gate) * up is two ops over strided chunks); here each is one pass with the row in cache.
 * Semantics (HF Llama, in fp32 whatever the storage dtype; bf16 is widened on load and rounded
 * to nearest even once on store):
 *
 *   add_rms_norm: h[t] = x[t] (+ delta[t]);  x[t] = h[t];  out[t] = h[t] / sqrt(mean(h[t]^2) + eps) * w
 *   rope:         for each head's D values: v' = v * cos[pos] + swap_halves(v) * sin[pos]
 *                 (sin's first half negated, engine/model/rope.py's tables), in place
 *   silu_mul:     out[t, i] = g / (1 + e^-g) * u,   g = gate_up[t, i], u = gate_up[t, I + i]
 *
 * add_rms_norm's delta, silu_mul's gate_up and rope's fused q/k/v rows may come with a tied
 * projection's delta to add first
 * (tied_delta.h: rows adapted in an fp32 scratch chunk by chunk, so the projection's output is read
 * once); add_rms_norm without an output only adds (x += delta).
 *
 * Rows are split over num_threads jobs (parallel.h; 1 for small tensors); calls are reentrant.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "tied_delta.h"
#include "vec16.h"

#define MAX_HEAD_DIM 256

typedef struct {
    float *x;
    const void *delta, *src;
    void *out;
    const float *weight, *cos, *sin;
    const int64_t *positions;
    int64_t delta_stride, src_stride, out_stride, first, last, width;
    int delta_bf16, out_bf16, heads, head_dim;
    float eps;
    tied_delta_t tied;        /* the delta's (rms) or gate_up's (silu) tied delta; plan NULL: none */
    int rc;                   /* set by a job: 0, or < 0 (no scratch memory, a tied op's refusal) */
} job_t;

static inline vec16 load_any(const void *p, int64_t at, int bf16) {
    return bf16 ? load16_bf16((const uint16_t *)p + at) : load16((const float *)p + at);
}

static inline void store_any(void *p, int64_t at, vec16 v, int bf16) {
    if (bf16)
        store16_bf16((uint16_t *)p + at, v);
    else
        store16((float *)p + at, v);
}

static void *rms_rows(void *arg) {
    job_t *j = arg;
    const int64_t H = j->width;
    float *scratch = j->tied.plan ? thread_scratch(0, sizeof(float) * TIED_CHUNK * H) : NULL;
    if (j->tied.plan && !scratch) { j->rc = -2; return NULL; }
    for (int64_t t0 = j->first; t0 < j->last; t0 += TIED_CHUNK) {
        const int64_t t1 = t0 + TIED_CHUNK < j->last ? t0 + TIED_CHUNK : j->last;
        const int adapted = j->tied.plan ? tied_delta_rows(&j->tied, j->delta, j->delta_stride, j->delta_bf16, t0, t1, j->last, H,
                                                      scratch) : 0;
        if (adapted < 0) { j->rc = adapted; break; }
        for (int64_t t = t0; t < t1; t++) {
            float *x = j->x + t * H;
            /* the delta row: the adapted scratch copy, or delta itself */
            const void *delta = adapted ? (const void *)(scratch + (t - t0) * H) : j->delta;
            const int64_t at = adapted ? 0 : t * j->delta_stride;
            const int bf16 = adapted ? 0 : j->delta_bf16;
            vec16 sq = splat(0.0f);
            for (int64_t i = 0; i < H; i += 16) {
                vec16 h = load16(x + i);
                if (delta) h += load_any(delta, at + i, bf16);
                store16(x + i, h);
                sq += h * h;
            }
            if (!j->out) continue; /* add only */
            const float inv = 1.0f / sqrtf(hsum16(sq) / (float)H + j->eps);
            for (int64_t i = 0; i < H; i += 16)
                store_any(j->out, t * j->out_stride + i, load16(x + i) * inv * load16(j->weight + i), j->out_bf16);
        }
    }
    return NULL;
}

/* one head's D values v (fp32) rotated for position tables cos, sin, stored at out[at] */
static inline void rotate_head(const float *v, const float *cos, const float *sin, void *out, int64_t at, int D,
                               int bf16) {
    float rotated[MAX_HEAD_DIM];
    const int half = D / 2;
    memcpy(rotated, v + half, sizeof(float) * half);
    memcpy(rotated + half, v, sizeof(float) * half);
    for (int i = 0; i < D; i += 16)
        store_any(out, at + i, load16(v + i) * load16(cos + i) + load16(rotated + i) * load16(sin + i), bf16);
}

static void *rope_rows(void *arg) {
    job_t *j = arg;
    const int D = j->head_dim;
    const int64_t W = j->width; /* with a tied delta: the whole fused row (q, k heads, then the rest) */
    float v[MAX_HEAD_DIM];
    float *scratch = j->tied.plan ? thread_scratch(0, sizeof(float) * TIED_CHUNK * W) : NULL;
    if (j->tied.plan && !scratch) { j->rc = -2; return NULL; }
    for (int64_t t0 = j->first; t0 < j->last; t0 += TIED_CHUNK) {
        const int64_t t1 = t0 + TIED_CHUNK < j->last ? t0 + TIED_CHUNK : j->last;
        const int adapted = j->tied.plan ? tied_delta_rows(&j->tied, j->out, j->out_stride, j->out_bf16, t0, t1, j->last, W,
                                                           scratch) : 0;
        if (adapted < 0) { j->rc = adapted; break; }
        for (int64_t t = t0; t < t1; t++) {
            const float *cos = j->cos + j->positions[t] * D, *sin = j->sin + j->positions[t] * D;
            const int64_t row = t * j->out_stride;
            if (adapted) { /* rotate the adapted q/k heads, then store the rest of the adapted row (v) */
                const float *src = scratch + (t - t0) * W;
                for (int h = 0; h < j->heads; h++)
                    rotate_head(src + (int64_t)h * D, cos, sin, j->out, row + (int64_t)h * D, D, j->out_bf16);
                int64_t i = (int64_t)j->heads * D;
                for (; i + 16 <= W; i += 16) store_any(j->out, row + i, load16(src + i), j->out_bf16);
                for (; i < W; i++) {
                    if (j->out_bf16) ((uint16_t *)j->out)[row + i] = f32_to_bf16(src[i]);
                    else ((float *)j->out)[row + i] = src[i];
                }
                continue;
            }
            for (int h = 0; h < j->heads; h++) {
                const int64_t at = row + (int64_t)h * D;
                for (int i = 0; i < D; i += 16) store16(v + i, load_any(j->out, at + i, j->out_bf16));
                rotate_head(v, cos, sin, j->out, at, D, j->out_bf16);
            }
        }
    }
    return NULL;
}

static void *silu_rows(void *arg) {
    job_t *j = arg;
    const int64_t I = j->width;
    float *scratch = j->tied.plan ? thread_scratch(0, sizeof(float) * TIED_CHUNK * 2 * I) : NULL;
    if (j->tied.plan && !scratch) { j->rc = -2; return NULL; }
    for (int64_t t0 = j->first; t0 < j->last; t0 += TIED_CHUNK) {
        const int64_t t1 = t0 + TIED_CHUNK < j->last ? t0 + TIED_CHUNK : j->last;
        const int adapted = j->tied.plan ? tied_delta_rows(&j->tied, j->src, j->src_stride, j->out_bf16, t0, t1, j->last, 2 * I,
                                                      scratch) : 0;
        if (adapted < 0) { j->rc = adapted; break; }
        for (int64_t t = t0; t < t1; t++) {
            /* the gate/up row: the adapted scratch copy, or gate_up itself */
            const void *src = adapted ? (const void *)(scratch + (t - t0) * 2 * I) : j->src;
            const int64_t at = adapted ? 0 : t * j->src_stride;
            const int bf16 = adapted ? 0 : j->out_bf16;
            for (int64_t i = 0; i < I; i += 16) {
                vec16 g = load_any(src, at + i, bf16);
                vec16 u = load_any(src, at + I + i, bf16);
                store_any(j->out, t * j->out_stride + i, g / (1.0f + exp16(-g)) * u, j->out_bf16);
            }
        }
    }
    return NULL;
}

/* Runs fn over rows [0, rows) split into num_threads jobs copied from *proto; returns 0, or the
 * first job's error (-2: no scratch memory; -1: a tied delta the tied op refuses). */
static int run_split(void *(*fn)(void *), const job_t *proto, int64_t rows, int num_threads) {
    num_threads = clamp_jobs(num_threads, rows);
    job_t jobs[MAX_JOBS];
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = *proto;
        jobs[t].first = rows * t / num_threads;
        jobs[t].last = rows * (t + 1) / num_threads;
        jobs[t].rc = 0;
    }
    parallel_jobs(fn, jobs, sizeof jobs[0], num_threads);
    for (int t = 0; t < num_threads; t++)
        if (jobs[t].rc) return jobs[t].rc;
    return 0;
}

/* x [T, H] fp32 contiguous (updated in place when delta is given); delta [T, H] rows delta_stride
 * apart or NULL; weight [H] fp32; out [T, H] rows out_stride apart, or NULL: only x += delta.
 * tied_plan, tied_step: delta's tied delta (tied_delta.h), or NULL. H a multiple of 16. */
int nlora_add_rms_norm(float *x, int64_t rows, int64_t hidden, const void *delta, int64_t delta_stride,
                       int delta_bf16, const float *weight, float eps, void *out, int64_t out_stride, int out_bf16,
                       int num_threads, const tied_plan_t *tied_plan, const tied_step_t *tied_step) {
    if (hidden % 16 || (tied_plan && (!delta || !tied_step))) return -1;
    job_t j = {.x = x, .delta = delta, .out = out, .weight = weight, .delta_stride = delta_stride,
               .out_stride = out_stride, .width = hidden, .delta_bf16 = delta_bf16, .out_bf16 = out_bf16,
               .eps = eps, .tied = {tied_plan, tied_step}};
    return run_split(rms_rows, &j, rows, num_threads);
}

/* qk [T, heads, D] rows row_stride apart, heads contiguous, rotated in place; positions [T];
 * cos, sin [max_len, D] fp32. D a multiple of 32 up to 256. tied_plan, tied_step: the tied delta
 * of the fused output whose rows start at qk (row_width columns: the q and k heads, then the rest,
 * e.g. v), added to the whole row before the rotation (tied_delta.h), or NULL. */
int nlora_rope(void *qk, int64_t rows, int64_t row_stride, int heads, int head_dim, const int64_t *positions,
               const float *cos, const float *sin, int is_bf16, int num_threads, int64_t row_width,
               const tied_plan_t *tied_plan, const tied_step_t *tied_step) {
    if (head_dim % 32 || head_dim > MAX_HEAD_DIM) return -1;
    if (tied_plan && (!tied_step || row_width < (int64_t)heads * head_dim || row_width > row_stride)) return -1;
    job_t j = {.out = qk, .cos = cos, .sin = sin, .positions = positions, .out_stride = row_stride,
               .heads = heads, .head_dim = head_dim, .out_bf16 = is_bf16, .width = row_width,
               .tied = {tied_plan, tied_step}};
    return run_split(rope_rows, &j, rows, num_threads);
}

/* gate_up [T, 2I] rows src_stride apart (gate then up); out [T, I] rows out_stride apart, the
 * same dtype; tied_plan, tied_step: gate_up's tied delta (tied_delta.h), or NULL. I a multiple of 16. */
int nlora_silu_mul(const void *gate_up, int64_t rows, int64_t inter, int64_t src_stride, void *out,
                   int64_t out_stride, int is_bf16, int num_threads, const tied_plan_t *tied_plan,
                   const tied_step_t *tied_step) {
    if (inter % 16 || (tied_plan && !tied_step)) return -1;
    job_t j = {.src = gate_up, .out = out, .src_stride = src_stride, .out_stride = out_stride, .width = inter,
               .out_bf16 = is_bf16, .tied = {tied_plan, tied_step}};
    return run_split(silu_rows, &j, rows, num_threads);
}
