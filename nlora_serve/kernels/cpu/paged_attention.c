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
 * value row comes from memory once per (sequence, kv head), and one pass over the rows serves up
 * to four of its G query heads at once (their q vectors and accumulators in registers), so a row
 * is loaded once, not once per query head.
 * Arithmetic in fp32 (scores, a max-subtracted softmax with a polynomial exp, accumulators); the
 * bf16 variant takes q.K as exact bf16 products summed in fp32 (VDPBF16PS where the CPU has
 * AVX512-BF16, else widened on load), widens V on load and rounds out once.
 *
 * Measured (2-core Xeon, bf16, 64 sequences x 130-190 positions, 30 layers' caches cycled so every
 * call reads from memory as in the engine, 2 threads, best of 15): one pass per query head and
 * every row of the sequence prefetched up front 0.83 ms a layer; one pass for the group 0.70 ms;
 * with the prefetch running DIST positions ahead of the first kv head's pass 0.64 ms (whole-
 * sequence prefetch into L1 evicted rows before use; prefetching the next sequence instead, or
 * none, 1.15-1.25 ms). On a 2-core Zen 4, that prefetch into L2 rather than L1: bf16
 * 0.67 -> 0.53 ms a layer, fp32 1.00 -> 0.88 (DIST 8-96 alike; an extra L1 prefetch of the next
 * few K rows gained nothing).
 *
 * Threads: sequences are split over num_threads jobs (parallel.h: torch's OpenMP workers where
 * built with OpenMP); each job owns its score buffer, so the call is reentrant.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vec16.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
/* bf16 dot products 32 pairs at a time (VDPBF16PS: exact bf16 products, fp32 accumulation) */
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
/* positions ahead that the first kv head's pass prefetches (every head's K and V rows) */
#define DIST 16

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *tables, *ctx_lens;
    int64_t q_stride, out_stride, table_stride, first, last;
    int num_heads, num_kv_heads, head_dim, block_size, is_bf16, status;
    float scale;
} job_t;

static inline __attribute__((always_inline)) vec16 load_kv(const void *base, int64_t at, const int bf16) {
    return bf16 ? load16_bf16((const uint16_t *)base + at) : load16((const float *)base + at);
}

/* Positions p of sequence n in the cache, as element offsets of kv head h's row, into rows[c]. */
static inline void row_offsets(const job_t *j, int64_t n, int h, int64_t c, int64_t *rows) {
    const int D = j->head_dim, KVH = j->num_kv_heads, BS = j->block_size;
    const int64_t *table = j->tables + n * j->table_stride;
    for (int64_t b = 0, p = 0; p < c; b++) /* block by block: no division per position */
        for (int64_t o = 0; o < BS && p < c; o++, p++) rows[p] = ((table[b] * BS + o) * KVH + h) * D;
}

/* every kv head's K and V rows of position p (contiguous: [pos][kvh][D]), into L2 (prefetcht1):
 * a sequence's rows (130-190 positions: 100-300 KB) fit L2, not L1, and were read back from L2
 * anyway by the other kv heads' passes and the V pass; prefetched into L1 they also evicted what
 * the pass was using (20.0 -> 15.8 ms a 30-layer step bf16, 30.0 -> 26.3 fp32) */
static inline __attribute__((always_inline)) void prefetch_pos(const job_t *j, const int64_t *rows, int64_t p, int h, const int bf16) {
    const int64_t span = (int64_t)j->num_kv_heads * j->head_dim * (bf16 ? 2 : 4);
    const int64_t at = (rows[p] - (int64_t)h * j->head_dim) * (bf16 ? 2 : 4);
    for (int64_t byte = 0; byte < span; byte += 64) {
        __builtin_prefetch((const char *)j->k + at + byte, 0, 2);
        __builtin_prefetch((const char *)j->v + at + byte, 0, 2);
    }
}

/* query heads g0 .. g0 + GN - 1 of kv head h (GN <= 4) over c positions, in one pass over the K
 * rows and one over the V rows: each row is loaded once for the GN heads, whose q vectors and
 * accumulators stay in registers (GN, V = D / 16 and bf16 are constants where inlined). */
static inline __attribute__((always_inline)) void attend_heads(const job_t *j, int64_t n, int h, int g0, const int GN,
                                                               float *s, int64_t c_pad, const int64_t *rows,
                                                               const int V, const int bf16) {
    const int G = j->num_heads / j->num_kv_heads, D = j->head_dim;
    const int64_t c = j->ctx_lens[n];
    const int64_t q_at = n * j->q_stride + (int64_t)(h * G + g0) * D;
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#if HAVE_DPBF16
    if (bf16 && V % 2 == 0) { /* q and K stay bf16: 2 instructions per 32 dims */
        __m512bh qb[4][MAX_HEAD_DIM / 32];
        for (int g = 0; g < GN; g++)
            for (int v = 0; v < V / 2; v++)
                qb[g][v] = (__m512bh)_mm512_loadu_si512((const uint16_t *)j->q + q_at + g * D + 32 * v);
        for (int64_t p = 0; p < c; p++) {
            if (h == 0 && g0 == 0 && p + DIST < c) prefetch_pos(j, rows, p + DIST, h, bf16);
            const uint16_t *k = (const uint16_t *)j->k + rows[p];
            __m512bh kr[MAX_HEAD_DIM / 32];
            for (int v = 0; v < V / 2; v++) kr[v] = (__m512bh)_mm512_loadu_si512(k + 32 * v);
            for (int g = 0; g < GN; g++) {
                __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), qb[g][0], kr[0]);
                for (int v = 1; v < V / 2; v++) d = _mm512_dpbf16_ps(d, qb[g][v], kr[v]);
                const float x = hsum16((vec16)d) * j->scale;
                s[g * c_pad + p] = x;
                m[g] = x > m[g] ? x : m[g];
            }
        }
    } else
#endif
    {
        vec16 q[4][MAX_HEAD_DIM / 16];
        for (int g = 0; g < GN; g++)
            for (int v = 0; v < V; v++) q[g][v] = load_kv(j->q, q_at + g * D + 16 * v, bf16) * j->scale;
        for (int64_t p = 0; p < c; p++) {
            if (h == 0 && g0 == 0 && p + DIST < c) prefetch_pos(j, rows, p + DIST, h, bf16);
            vec16 kr[MAX_HEAD_DIM / 16];
            for (int v = 0; v < V; v++) kr[v] = load_kv(j->k, rows[p] + 16 * v, bf16);
            for (int g = 0; g < GN; g++) {
                vec16 d = q[g][0] * kr[0];
                for (int v = 1; v < V; v++) d += q[g][v] * kr[v];
                const float x = hsum16(d);
                s[g * c_pad + p] = x;
                m[g] = x > m[g] ? x : m[g];
            }
        }
    }
    float inv_sum[4];
    for (int g = 0; g < GN; g++) {
        float *sg = s + g * c_pad;
        for (int64_t p = c; p < c_pad; p++) sg[p] = -INFINITY;
        vec16 total = splat(0.0f);
        for (int64_t p = 0; p < c_pad; p += 16) {
            vec16 w = exp16(load16(sg + p) - m[g]);
            store16(sg + p, w);
            total += w;
        }
        inv_sum[g] = 1.0f / hsum16(total);
    }
    vec16 acc[4][MAX_HEAD_DIM / 16];
    for (int g = 0; g < GN; g++)
        for (int v = 0; v < V; v++) acc[g][v] = splat(0.0f);
    for (int64_t p = 0; p < c; p++) {
        vec16 vr[MAX_HEAD_DIM / 16];
        for (int v = 0; v < V; v++) vr[v] = load_kv(j->v, rows[p] + 16 * v, bf16);
        for (int g = 0; g < GN; g++) {
            const vec16 w = splat(s[g * c_pad + p]);
            for (int v = 0; v < V; v++) acc[g][v] += w * vr[v];
        }
    }
    for (int g = 0; g < GN; g++) {
        const int64_t at = n * j->out_stride + (int64_t)(h * G + g0 + g) * D;
        for (int v = 0; v < V; v++) {
            const vec16 o = acc[g][v] * inv_sum[g];
            if (bf16)
                store16_bf16((uint16_t *)j->out + at + 16 * v, o);
            else
                store16((float *)j->out + at + 16 * v, o);
        }
    }
}

/* one (sequence, kv head): its G query heads, up to four per pass over the rows */
static inline __attribute__((always_inline)) void attend(const job_t *j, int64_t n, int h, float *s, int64_t c_pad,
                                                         int64_t *rows, const int V, const int bf16) {
    const int G = j->num_heads / j->num_kv_heads;
    const int64_t c = j->ctx_lens[n];
    row_offsets(j, n, h, c, rows);
    if (h == 0)
        for (int64_t p = 0; p < c && p < DIST; p++) prefetch_pos(j, rows, p, h, bf16);
    for (int g0 = 0; g0 < G; g0 += 4) {
        switch (G - g0 < 4 ? G - g0 : 4) {
        case 1: attend_heads(j, n, h, g0, 1, s, c_pad, rows, V, bf16); break;
        case 2: attend_heads(j, n, h, g0, 2, s, c_pad, rows, V, bf16); break;
        case 3: attend_heads(j, n, h, g0, 3, s, c_pad, rows, V, bf16); break;
        default: attend_heads(j, n, h, g0, 4, s, c_pad, rows, V, bf16); break;
        }
    }
}

static void *run_job(void *arg) {
    job_t *j = arg;
    int64_t c_max = 0;
    for (int64_t n = j->first; n < j->last; n++) c_max = j->ctx_lens[n] > c_max ? j->ctx_lens[n] : c_max;
    const int64_t c_pad = (c_max + 15) / 16 * 16;
    const int G = j->num_heads / j->num_kv_heads, D = j->head_dim, bf16 = j->is_bf16;
    float *s = thread_scratch(0, sizeof(float) * (size_t)(G * c_pad + 16));
    int64_t *rows = thread_scratch(1, sizeof(int64_t) * (size_t)(c_max + 1));
    if (s == NULL || rows == NULL) {
        j->status = -2;
        return NULL;
    }
    for (int64_t n = j->first; n < j->last; n++)
        for (int h = 0; h < j->num_kv_heads; h++) {
            if (D == 64 && bf16) attend(j, n, h, s, c_pad, rows, 4, 1);
            else if (D == 64) attend(j, n, h, s, c_pad, rows, 4, 0);
            else if (D == 128 && bf16) attend(j, n, h, s, c_pad, rows, 8, 1);
            else if (D == 128) attend(j, n, h, s, c_pad, rows, 8, 0);
            else attend(j, n, h, s, c_pad, rows, D / 16, bf16);
        }
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
    num_threads = clamp_jobs(num_threads, num_seqs);
    job_t jobs[MAX_JOBS];
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = (job_t){q, k_cache, v_cache, out, tables, ctx_lens, q_stride, out_stride, table_stride,
                          num_seqs * t / num_threads, num_seqs * (t + 1) / num_threads, num_heads, num_kv_heads,
                          head_dim, block_size, is_bf16, -2, scale};
    }
    parallel_jobs(run_job, jobs, sizeof jobs[0], num_threads);
    int status = 0;
    for (int t = 0; t < num_threads; t++)
        if (jobs[t].status) status = jobs[t].status;
    return status;
}

/* This step's keys and values into the cache: for t < T, K[slots[t]] = k[t] and V[slots[t]] = v[t],
 * each a row of row_bytes (KVH x D entries) in a cache of num_slots rows ([NB * BS, KVH, D]); k
 * and v rows k_stride / v_stride bytes apart. What two torch index_copy_ calls did, at ~30 µs a
 * layer of Python and dispatch for 64 rows. Returns 0; -1 (nothing written) when a slot
 * is outside [0, num_slots). */
int nlora_write_kv(void *k_cache, void *v_cache, int64_t num_slots, const void *k, int64_t k_stride, const void *v,
                   int64_t v_stride, const int64_t *slots, int64_t num_tokens, int64_t row_bytes) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < num_tokens; t++) {
        memcpy((char *)k_cache + slots[t] * row_bytes, (const char *)k + t * k_stride, (size_t)row_bytes);
        memcpy((char *)v_cache + slots[t] * row_bytes, (const char *)v + t * v_stride, (size_t)row_bytes);
    }
    return 0;
}
