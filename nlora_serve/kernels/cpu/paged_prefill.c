/* Prefill attention straight over the paged KV cache, for the CPU (DESIGN §5).
 *
 * Semantics, for every prefill chunk c (its query tokens are rows q_starts[c] .. q_starts[c+1] - 1
 * of q and out, q_len of them), query head i with kv head h = i / G, and the chunk's query token
 * r at position pos = ctx_lens[c] - q_len + r (the cached prefix, then the chunk itself):
 *
 *     s[p]      = scale * q[r, i] . K[c, h, p]                  p <= pos   (causal)
 *     out[r, i] = sum_p softmax(s)[p] * V[c, h, p]
 *
 * with position p in block tables[c, p / BS] at offset p % BS of the cache [num_blocks, BS, KVH, D]
 * (this step's keys and values already written there). One kernel serves a chunk with or without a
 * cached prefix: the prefix is just the positions below the chunk's first.
 *
 * How (flash-attention's online softmax, laid out for 16-lane vectors): a work item is one
 * (chunk, kv head, tile of QT query tokens). It stages its keys SPAN positions at a time: K
 * transposed in blocks of 16 positions (Kt[d] holds dimension d of 16 keys, so one query's 16
 * scores are D broadcast-FMAs, with no horizontal sum per key) and V widened to fp32. Each staged
 * block then serves all QT x G query vectors of the tile, up to four query heads of one token at
 * a time, whose scores, running max, running sum and D-wide accumulators stay in registers over
 * the token's keys. Arithmetic in fp32 (bf16 q, K and V widened exactly on load, out rounded once).
 *
 * Threads: items are pulled from a shared counter by num_threads jobs (parallel.h), the costliest
 * (last tiles of a chunk) first; each job owns its staging buffers, so the call is reentrant.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vec16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define QT 32   /* query tokens per work item */
#define SPAN 512 /* key positions staged at a time (Kt + V: 2 * SPAN * D * 4 bytes, 256 KB at D = 64) */

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int32_t *tables;
    const int64_t *q_starts, *ctx_lens, *items; /* items: (chunk << 32 | tile), costliest first */
    int64_t q_stride, out_stride, table_stride, num_items, max_ctx;
    int num_heads, num_kv_heads, head_dim, block_size, is_bf16;
    float scale;
    int64_t next; /* the next item * KVH + kv head to take (atomic) */
} shared_t;

typedef struct {
    shared_t *s;
    int status;
} job_t;

static inline __attribute__((always_inline)) vec16 load_kv(const void *base, int64_t at, const int bf16) {
    return bf16 ? load16_bf16((const uint16_t *)base + at) : load16((const float *)base + at);
}

/* Stage positions s0 .. s1 - 1 of kv head h (their element offsets in rows[]): kt[b][d][16] the
 * keys of block b transposed, vs[p][D] the values widened; positions past s1 are zeros. */
static inline __attribute__((always_inline)) void stage(const shared_t *s, const int64_t *rows, int64_t s0,
                                                        int64_t s1, float *kt, float *vs, const int V, const int bf16) {
    const int D = 16 * V;
    for (int64_t b = 0; s0 + 16 * b < s1; b++) {
        const int64_t p0 = s0 + 16 * b, n = s1 - p0 < 16 ? s1 - p0 : 16;
        for (int v = 0; v < V; v++) {
            vec16 m[16];
            for (int i = 0; i < 16; i++) {
                m[i] = i < n ? load_kv(s->k, rows[p0 + i] + 16 * v, bf16) : splat(0.0f);
                store16(vs + (16 * b + i) * D + 16 * v, i < n ? load_kv(s->v, rows[p0 + i] + 16 * v, bf16) : splat(0.0f));
            }
            transpose16(m);
            for (int t = 0; t < 16; t++) store16(kt + (b * D + 16 * v + t) * 16, m[t]);
        }
    }
}

/* Query heads g0 .. g0 + GN - 1 (of kv head h) of one token over staged positions s0 .. last - 1;
 * their running state (max m, lane-wise sum l, accumulators acc) is read from and written back to
 * state[g] (each 2 + ... floats: m, then l[16], then acc[D]). */
static inline __attribute__((always_inline)) void attend_token(const shared_t *s, int64_t token, int h, int g0,
                                                               const int GN, int64_t s0, int64_t last,
                                                               const float *kt, const float *vs, float *state,
                                                               const int V, const int bf16) {
    const int G = s->num_heads / s->num_kv_heads, D = 16 * V, W = 17 + D; /* state floats per head */
    float qv[4][MAX_HEAD_DIM];
    float m[4];
    vec16 l[4], acc[4][MAX_HEAD_DIM / 16];
    for (int g = 0; g < GN; g++) {
        const int64_t at = token * s->q_stride + (int64_t)(h * G + g0 + g) * D;
        for (int v = 0; v < V; v++) store16(qv[g] + 16 * v, load_kv(s->q, at + 16 * v, bf16) * s->scale);
        const float *st = state + (g0 + g) * W;
        m[g] = st[0];
        l[g] = load16(st + 1);
        for (int v = 0; v < V; v++) acc[g][v] = load16(st + 17 + 16 * v);
    }
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    float ps[4][16];
    for (int64_t b = 0; s0 + 16 * b < last; b++) {
        const int64_t valid = last - (s0 + 16 * b);
        const float *k = kt + b * D * 16;
        vec16 sc[4], sc2[4]; /* two partial sums per head: FMA latency, not its throughput, bounds one chain */
        for (int g = 0; g < GN; g++) sc[g] = sc2[g] = splat(0.0f);
        for (int d = 0; d < D; d += 2) {
            vec16 kd = load16(k + 16 * d), kd2 = load16(k + 16 * d + 16);
            KEEP_IN_REGISTER(kd); /* one load for the GN heads, not one per FMA: loads bound this loop */
            KEEP_IN_REGISTER(kd2);
            for (int g = 0; g < GN; g++) {
                sc[g] += bcast16(qv[g][d]) * kd;
                sc2[g] += bcast16(qv[g][d + 1]) * kd2;
            }
        }
        for (int g = 0; g < GN; g++) sc[g] += sc2[g];
        for (int g = 0; g < GN; g++) {
            if (valid < 16) sc[g] = select16(lane >= (int32_t)valid, splat(-INFINITY), sc[g]);
            const float mx = hmax16(sc[g]), mn = mx > m[g] ? mx : m[g];
            /* 0 on the first block (m = -inf); exp16, not expf: a libm call would spill every
             * accumulator (vector registers are caller-saved) */
            const vec16 alpha = exp16(bcast16(m[g] - mn));
            const vec16 p = exp16(sc[g] - mn);   /* masked lanes: exp(-inf) = 0 */
            l[g] = l[g] * alpha + p;
            for (int v = 0; v < V; v++) acc[g][v] *= alpha;
            m[g] = mn;
            store16(ps[g], p);
        }
        const int nj = valid < 16 ? (int)valid : 16;
        const float *vb = vs + 16 * b * D;
        for (int j = 0; j < nj; j++)
            for (int v = 0; v < V; v++) {
                vec16 vr = load16(vb + j * D + 16 * v);
                KEEP_IN_REGISTER(vr);
                for (int g = 0; g < GN; g++) acc[g][v] += bcast16(ps[g][j]) * vr;
            }
    }
    for (int g = 0; g < GN; g++) {
        float *st = state + (g0 + g) * W;
        st[0] = m[g];
        store16(st + 1, l[g]);
        for (int v = 0; v < V; v++) store16(st + 17 + 16 * v, acc[g][v]);
    }
}

/* one item: kv head h of chunk c's query tokens r0 .. r1 - 1 */
static inline __attribute__((always_inline)) void run_item(const shared_t *s, int64_t c, int64_t r0, int64_t r1,
                                                           int h, float *kt, float *vs, float *state,
                                                           int64_t *rows, const int V, const int bf16) {
    const int G = s->num_heads / s->num_kv_heads, D = 16 * V, W = 17 + D, BS = s->block_size,
              KVH = s->num_kv_heads;
    const int64_t q0 = s->q_starts[c], q_len = s->q_starts[c + 1] - q0, cached = s->ctx_lens[c] - q_len;
    const int64_t key_end = cached + r1; /* the tile's last token attends to positions < key_end */
    const int32_t *table = s->tables + c * s->table_stride;
    for (int64_t b = 0, p = 0; p < key_end; b++)
        for (int64_t o = 0; o < BS && p < key_end; o++, p++) rows[p] = (((int64_t)table[b] * BS + o) * KVH + h) * D;
    for (int64_t r = r0; r < r1; r++)
        for (int g = 0; g < G; g++) {
            float *st = state + ((r - r0) * G + g) * W;
            st[0] = -INFINITY;
            memset(st + 1, 0, sizeof(float) * (size_t)(16 + D));
        }
    for (int64_t s0 = 0; s0 < key_end; s0 += SPAN) {
        const int64_t s1 = key_end - s0 < SPAN ? key_end : s0 + SPAN;
        stage(s, rows, s0, s1, kt, vs, V, bf16);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t pos = cached + r;
            if (pos < s0) continue;
            const int64_t last = pos + 1 < s1 ? pos + 1 : s1;
            float *st = state + (r - r0) * G * W;
            for (int g0 = 0; g0 < G; g0 += 4) {
                switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: attend_token(s, q0 + r, h, g0, 1, s0, last, kt, vs, st, V, bf16); break;
                case 2: attend_token(s, q0 + r, h, g0, 2, s0, last, kt, vs, st, V, bf16); break;
                case 3: attend_token(s, q0 + r, h, g0, 3, s0, last, kt, vs, st, V, bf16); break;
                default: attend_token(s, q0 + r, h, g0, 4, s0, last, kt, vs, st, V, bf16); break;
                }
            }
        }
    }
    for (int64_t r = r0; r < r1; r++)
        for (int g = 0; g < G; g++) {
            const float *st = state + ((r - r0) * G + g) * W;
            const float inv = 1.0f / hsum16(load16(st + 1));
            const int64_t at = (q0 + r) * s->out_stride + (int64_t)(h * G + g) * D;
            for (int v = 0; v < V; v++) {
                const vec16 o = load16(st + 17 + 16 * v) * inv;
                if (bf16)
                    store16_bf16((uint16_t *)s->out + at + 16 * v, o);
                else
                    store16((float *)s->out + at + 16 * v, o);
            }
        }
}

static void *run_job(void *arg) {
    job_t *j = arg;
    shared_t *s = j->s;
    const int G = s->num_heads / s->num_kv_heads, D = s->head_dim, KVH = s->num_kv_heads, bf16 = s->is_bf16;
    float *kt = thread_scratch(0, sizeof(float) * (size_t)SPAN * D * 2);
    float *state = thread_scratch(1, sizeof(float) * (size_t)QT * G * (17 + D));
    int64_t *rows = thread_scratch(2, sizeof(int64_t) * (size_t)(s->max_ctx + 1));
    if (kt == NULL || state == NULL || rows == NULL) {
        j->status = -2;
        return NULL;
    }
    float *vs = kt + (size_t)SPAN * D;
    for (;;) {
        const int64_t at = __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED);
        if (at >= s->num_items * KVH) break;
        const int64_t item = s->items[at / KVH], c = item >> 32, t = item & 0xffffffff;
        const int h = (int)(at % KVH);
        const int64_t q_len = s->q_starts[c + 1] - s->q_starts[c];
        const int64_t r0 = t * QT, r1 = r0 + QT < q_len ? r0 + QT : q_len;
        if (D == 64 && bf16) run_item(s, c, r0, r1, h, kt, vs, state, rows, 4, 1);
        else if (D == 64) run_item(s, c, r0, r1, h, kt, vs, state, rows, 4, 0);
        else if (D == 128 && bf16) run_item(s, c, r0, r1, h, kt, vs, state, rows, 8, 1);
        else if (D == 128) run_item(s, c, r0, r1, h, kt, vs, state, rows, 8, 0);
        else run_item(s, c, r0, r1, h, kt, vs, state, rows, D / 16, bf16);
    }
    j->status = 0;
    return NULL;
}

/* Returns 0; -1 for a shape the static buffers cannot hold (D not a multiple of 16 or > 256,
 * G > 16) or a chunk whose query tokens outnumber its context; -2 when memory or a thread could
 * not be had. */
int nlora_paged_prefill(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                        const int32_t *tables, int64_t table_stride, const int64_t *q_starts, const int64_t *ctx_lens,
                        int64_t num_chunks, int num_heads, int num_kv_heads, int head_dim, int block_size,
                        float scale, void *out, int64_t out_stride, int is_bf16, int num_threads) {
    if (head_dim % 16 || head_dim > MAX_HEAD_DIM || num_heads % num_kv_heads || num_heads / num_kv_heads > MAX_GROUP)
        return -1;
    int64_t num_items = 0, max_ctx = 0;
    for (int64_t c = 0; c < num_chunks; c++) {
        const int64_t q_len = q_starts[c + 1] - q_starts[c];
        if (q_len < 0 || q_len > ctx_lens[c]) return -1;
        num_items += (q_len + QT - 1) / QT;
        max_ctx = ctx_lens[c] > max_ctx ? ctx_lens[c] : max_ctx;
    }
    if (num_items == 0) return 0;
    int64_t *items = malloc(sizeof(int64_t) * (size_t)num_items);
    if (items == NULL) return -2;
    /* each chunk's tiles last to first (a later tile attends to more keys), chunks in order */
    int64_t n = 0;
    for (int64_t c = 0; c < num_chunks; c++)
        for (int64_t t = (q_starts[c + 1] - q_starts[c] + QT - 1) / QT - 1; t >= 0; t--) items[n++] = c << 32 | t;
    shared_t s = {q, k_cache, v_cache, out, tables, q_starts, ctx_lens, items, q_stride, out_stride, table_stride,
                  num_items, max_ctx, num_heads, num_kv_heads, head_dim, block_size, is_bf16, scale, 0};
    num_threads = clamp_jobs(num_threads, num_items * num_kv_heads);
    job_t jobs[MAX_JOBS];
    for (int t = 0; t < num_threads; t++) jobs[t] = (job_t){&s, -2};
    parallel_jobs(run_job, jobs, sizeof jobs[0], num_threads);
    free(items);
    int status = 0;
    for (int t = 0; t < num_threads; t++)
        if (jobs[t].status) status = jobs[t].status;
    return status;
}
