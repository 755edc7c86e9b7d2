/* Decode attention straight over the paged KV cache, for the CPU (DESIGN §5).
 *
 * Semantics, for every decode sequence n (one query token each) and query head i, with
 * kv head h = i / G (G = num_heads / num_kv_heads, grouped-query attention as in HF Llama) and
 * c = ctx_lens[n] cached positions:
 *
 *     s[p]   = scale * q[n, i] . K[n, h, p]                  p < c
 *     out[n, i] = sum_p softmax(s)[p] * V[n, h, p]
 *
 * where position p of sequence n lives in block tables[n, p / BS] at offset p % BS of the cache
 * [num_blocks, BS, KVH, D] (K and V separate, rows contiguous). Nothing is gathered: each key and
 * value row is read once from its block, for all G query heads of its kv head. Arithmetic in fp32
 * (scores, a max-subtracted softmax with a polynomial exp, accumulators); the bf16 variant widens
 * q, K, V on load and rounds out once.
 *
 * Threads: sequences are split over num_threads POSIX threads (the caller passes 1 for small
 * batches); each thread owns its score buffer, so the call is reentrant.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_THREADS 16

/* e^x for x <= 0 (max-subtracted scores), 16 lanes: x = n ln2 + f, |f| <= ln2/2, e^f by a
 * degree-6 Taylor polynomial (relative error < 2e-7), 2^n through the exponent bits. */
static inline vec16 exp16(vec16 x) {
    const vec16 lo = splat(-87.0f);
    i32x16 below = x < lo;
    vec16 xs;
    {
        i32x16 xi, loi;
        memcpy(&xi, &x, sizeof xi);
        memcpy(&loi, &lo, sizeof loi);
        xi = (xi & ~below) | (loi & below);
        memcpy(&xs, &xi, sizeof xs);
    }
    const vec16 shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vec16 n = (xs * 1.44269504f + shifter) - shifter;
    vec16 f = xs - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    vec16 p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
    vec16 scale;
    memcpy(&scale, &e, sizeof scale);
    vec16 out = p * scale;
    i32x16 oi;
    memcpy(&oi, &out, sizeof oi);
    oi &= ~below; /* e^x underflows to 0 below -87 */
    memcpy(&out, &oi, sizeof out);
    return out;
}

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *tables, *ctx_lens;
    int64_t q_stride, out_stride, table_stride, first, last;
    int num_heads, num_kv_heads, head_dim, block_size, is_bf16, status;
    float scale;
} job_t;

/* one (sequence, kv head): G query heads over c positions; scores [G][c_pad] in s */
static void attend(const job_t *j, int64_t n, int h, float *s, int64_t c_pad) {
    const int G = j->num_heads / j->num_kv_heads, D = j->head_dim, V = D / 16, KVH = j->num_kv_heads;
    const int64_t c = j->ctx_lens[n];
    vec16 q[MAX_GROUP][MAX_HEAD_DIM / 16], acc[MAX_GROUP][MAX_HEAD_DIM / 16];
    for (int g = 0; g < G; g++)
        for (int v = 0; v < V; v++) {
            const int64_t at = n * j->q_stride + (int64_t)(h * G + g) * D + 16 * v;
            q[g][v] = (j->is_bf16 ? load16_bf16((const uint16_t *)j->q + at) : load16((const float *)j->q + at)) * j->scale;
            acc[g][v] = splat(0.0f);
        }
    const int64_t *table = j->tables + n * j->table_stride;
    for (int64_t p = 0; p < c; p++) {
        const int64_t row = (table[p / j->block_size] * j->block_size + p % j->block_size) * KVH + h;
        vec16 k[MAX_HEAD_DIM / 16];
        for (int v = 0; v < V; v++)
            k[v] = j->is_bf16 ? load16_bf16((const uint16_t *)j->k + row * D + 16 * v) : load16((const float *)j->k + row * D + 16 * v);
        for (int g = 0; g < G; g++) {
            vec16 d = q[g][0] * k[0];
            for (int v = 1; v < V; v++) d += q[g][v] * k[v];
            s[g * c_pad + p] = hsum16(d);
        }
    }
    float inv_sum[MAX_GROUP];
    for (int g = 0; g < G; g++) {
        float *sg = s + g * c_pad, m = -INFINITY;
        for (int64_t p = 0; p < c; p++) m = sg[p] > m ? sg[p] : m;
        for (int64_t p = c; p < c_pad; p++) sg[p] = -INFINITY;
        vec16 total = splat(0.0f);
        for (int64_t p = 0; p < c_pad; p += 16) {
            vec16 w = exp16(load16(sg + p) - m);
            store16(sg + p, w);
            total += w;
        }
        inv_sum[g] = 1.0f / hsum16(total);
    }
    for (int64_t p = 0; p < c; p++) {
        const int64_t row = (table[p / j->block_size] * j->block_size + p % j->block_size) * KVH + h;
        for (int v = 0; v < V; v++) {
            vec16 val = j->is_bf16 ? load16_bf16((const uint16_t *)j->v + row * D + 16 * v) : load16((const float *)j->v + row * D + 16 * v);
            for (int g = 0; g < G; g++) acc[g][v] += s[g * c_pad + p] * val;
        }
    }
    for (int g = 0; g < G; g++)
        for (int v = 0; v < V; v++) {
            float o[16];
            store16(o, acc[g][v] * inv_sum[g]);
            const int64_t at = n * j->out_stride + (int64_t)(h * G + g) * D + 16 * v;
            if (j->is_bf16)
                for (int l = 0; l < 16; l++) ((uint16_t *)j->out)[at + l] = f32_to_bf16(o[l]);
            else
                memcpy((float *)j->out + at, o, sizeof o);
        }
}

static void *run_job(void *arg) {
    job_t *j = arg;
    int64_t c_max = 0;
    for (int64_t n = j->first; n < j->last; n++) c_max = j->ctx_lens[n] > c_max ? j->ctx_lens[n] : c_max;
    const int64_t c_pad = (c_max + 15) / 16 * 16;
    const int G = j->num_heads / j->num_kv_heads;
    float *s = malloc(sizeof(float) * (size_t)(G * c_pad + 16));
    if (s == NULL) { j->status = -2; return NULL; }
    for (int64_t n = j->first; n < j->last; n++)
        for (int h = 0; h < j->num_kv_heads; h++) attend(j, n, h, s, c_pad);
    free(s);
    j->status = 0;
    return NULL;
}

/* Returns 0; -1 for a shape the static buffers cannot hold (D not a multiple of 16 or > 256,
 * G > 16); -2 when memory or a thread could not be had. */
int nlora_paged_decode(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                       const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens, int64_t num_seqs,
                       int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                       void *out, int64_t out_stride, int is_bf16, int num_threads) {
    if (head_dim % 16 || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP)
        return -1;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > num_seqs) num_threads = (int)(num_seqs > 0 ? num_seqs : 1);
    job_t jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = (job_t){q, k_cache, v_cache, out, tables, ctx_lens, q_stride, out_stride, table_stride,
                          num_seqs * t / num_threads, num_seqs * (t + 1) / num_threads, num_heads, num_kv_heads,
                          head_dim, block_size, is_bf16, -2, scale};
    }
    int started = 1;
    for (int t = 1; t < num_threads; t++, started++)
        if (pthread_create(&threads[t], NULL, run_job, &jobs[t]) != 0) break;
    for (int t = started; t < num_threads; t++) run_job(&jobs[t]); /* no thread: run it here */
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < num_threads; t++) {
        if (t < started) pthread_join(threads[t], NULL);
        if (jobs[t].status) status = jobs[t].status;
    }
    return status;
}
