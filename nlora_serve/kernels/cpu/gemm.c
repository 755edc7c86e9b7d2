/* The base model's GEMMs on the CPU: y = x W^T with W packed once into column panels (DESIGN §5).
 *
 * Semantics: y[m, n] = sum_k x[m, k] W[n, k] for x [M, K] and W [N, K] (a Linear's weight, out x in),
 * fp32 accumulation; fp32 in and out, or bf16 in and out with products exact and y rounded once.
 *
 * Layout: W is packed at load into panels of NR = 48 output columns, each panel's K rows
 * contiguous: fp32 [P][K][NR]; bf16 [P][ceil(K/2)][NR][2], the pairs of consecutive k that
 * VDPBF16PS multiplies and adds in one step (a missing last k packed as zero). P = ceil(N / NR);
 * the last panel's missing columns are zeros and never stored.
 *
 * Kernel: an MR x NR = 8 x 48 block of y in 24 vector registers; per k (fp32) or k pair (bf16) it
 * loads the panel's three vectors of 16 columns once and broadcasts each of the block's 8 x values
 * (bf16: x pairs) into them: 24 FMAs (or VDPBF16PS) on 3 + 8 loads. The panel's K rows (110 KB
 * fp32 at K = 576) stay in L2 while the block walks down M; x's 8 rows stay in L1.
 *
 * Why ours and not oneDNN's: on the default model's shapes (2-core AMD EPYC, Zen 4, weights cold
 * as in a model's walk over its layers: bench/cpu_gemm.py, bench/RESULTS.md) ours ran 1.02-1.17x
 * oneDNN's prepacked GEMM at 64 rows in fp32 and 1.09-1.49x in bf16, 1.4-2.0x at 8 rows, even at
 * 2,048; in the engine's prefill steps as fast or faster (bench/RESULTS.md), so it runs every call.
 *
 * Threads: the panels are split over num_threads jobs (parallel.h), each writing its own columns.
 */
#include <stdint.h>
#include <string.h>

#include "parallel.h"
#include "vec16.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

#define NR 48
#define MR 8
#ifndef ROW_SPLIT
#define ROW_SPLIT 256 /* rows per job from which the jobs split rows, not panels */
#endif

/* 1 where this build runs the dtype fast (fp32: AVX-512 FMA; bf16: AVX512-BF16 dot products) */
int nlora_gemm_supported(int is_bf16) {
#if defined(__AVX512F__)
    return is_bf16 ? HAVE_DPBF16 : 1;
#else
    return 0;
#endif
}

/* elements of the packed form of an [N, K] weight */
int64_t nlora_gemm_packed_size(int64_t n, int64_t k, int is_bf16) {
    const int64_t panels = (n + NR - 1) / NR;
    return panels * NR * (is_bf16 ? 2 * ((k + 1) / 2) : k);
}

/* w [N, K] (row stride w_stride) -> out, nlora_gemm_packed_size elements */
void nlora_gemm_pack(const void *w, int64_t w_stride, int64_t n, int64_t k, void *out, int is_bf16) {
    const int64_t panels = (n + NR - 1) / NR;
    if (is_bf16) {
        const uint16_t *src = w;
        uint16_t *dst = out;
        const int64_t k2 = (k + 1) / 2;
        for (int64_t p = 0; p < panels; p++)
            for (int64_t kk = 0; kk < k2; kk++)
                for (int64_t c = 0; c < NR; c++)
                    for (int t = 0; t < 2; t++) {
                        const int64_t col = p * NR + c, at = 2 * kk + t;
                        dst[((p * k2 + kk) * NR + c) * 2 + t] = col < n && at < k ? src[col * w_stride + at] : 0;
                    }
    } else {
        const float *src = w;
        float *dst = out;
        for (int64_t p = 0; p < panels; p++)
            for (int64_t kk = 0; kk < k; kk++)
                for (int64_t c = 0; c < NR; c++) {
                    const int64_t col = p * NR + c;
                    dst[(p * k + kk) * NR + c] = col < n ? src[col * w_stride + kk] : 0.0f;
                }
    }
}

/* rows m .. m + mr - 1 of one panel: acc[r][v] = x[r] . panel columns 16 v .. 16 v + 15 */
static inline __attribute__((always_inline)) void block_f32(const float *x, int64_t x_stride, int64_t k,
                                                            const float *b, vec16 acc[MR][3], const int mr) {
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = acc[r][2] = splat(0.0f);
    for (int64_t kk = 0; kk < k; kk++) {
        vec16 b0 = load16(b + kk * NR), b1 = load16(b + kk * NR + 16), b2 = load16(b + kk * NR + 32);
        KEEP_IN_REGISTER(b0); /* loaded once for the mr rows, not once per FMA */
        KEEP_IN_REGISTER(b1);
        KEEP_IN_REGISTER(b2);
        for (int r = 0; r < mr; r++) {
            const vec16 a = bcast16(x[r * x_stride + kk]);
            acc[r][0] += a * b0;
            acc[r][1] += a * b1;
            acc[r][2] += a * b2;
        }
    }
}

#if HAVE_DPBF16
static inline __attribute__((always_inline)) void block_bf16(const uint16_t *x, int64_t x_stride, int64_t k,
                                                             const uint16_t *b, vec16 acc[MR][3], const int mr) {
    __m512 c[MR][3];
    for (int r = 0; r < mr; r++) c[r][0] = c[r][1] = c[r][2] = _mm512_setzero_ps();
    const int64_t k2 = (k + 1) / 2;
    for (int64_t kk = 0; kk < k2; kk++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + kk * NR * 2);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kk * NR * 2 + 32);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + kk * NR * 2 + 64);
        const int last = 2 * kk + 1 == k; /* odd K: the pair's second k is the packed zero */
        for (int r = 0; r < mr; r++) {
            uint32_t pair;
            if (last)
                pair = x[r * x_stride + 2 * kk];
            else
                memcpy(&pair, x + r * x_stride + 2 * kk, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
            c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
            c[r][2] = _mm512_dpbf16_ps(c[r][2], a, b2);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < 3; v++) acc[r][v] = (vec16)c[r][v];
}
#endif

/* rows m .. m + mr - 1 of y, columns of panel p (cols of them valid) */
static inline __attribute__((always_inline)) void block(const void *x, int64_t x_stride, int64_t k, const void *bp,
                                                        int64_t p, void *y, int64_t y_stride, int64_t m, int64_t cols,
                                                        const int mr, const int bf16) {
    vec16 acc[MR][3];
#if HAVE_DPBF16
    if (bf16)
        block_bf16((const uint16_t *)x + m * x_stride, x_stride, k, (const uint16_t *)bp + p * NR * 2 * ((k + 1) / 2),
                   acc, mr);
    else
#endif
        block_f32((const float *)x + m * x_stride, x_stride, k, (const float *)bp + p * NR * k, acc, mr);
    for (int r = 0; r < mr; r++) {
        const int64_t at = (m + r) * y_stride + p * NR;
        if (cols == NR) {
            for (int v = 0; v < 3; v++) {
                if (bf16)
                    store16_bf16((uint16_t *)y + at + 16 * v, acc[r][v]);
                else
                    store16((float *)y + at + 16 * v, acc[r][v]);
            }
        } else { /* the last panel: only its valid columns */
            float row[NR];
            for (int v = 0; v < 3; v++) store16(row + 16 * v, acc[r][v]);
            for (int64_t c = 0; c < cols; c++) {
                if (bf16)
                    ((uint16_t *)y)[at + c] = f32_to_bf16(row[c]);
                else
                    ((float *)y)[at + c] = row[c];
            }
        }
    }
}

typedef struct {
    const void *x, *bp;
    void *y;
    int64_t x_stride, y_stride, m0, m, k, n, first, last; /* rows m0 .. m - 1, panels first .. last - 1 */
    int is_bf16;
} job_t;

#ifndef MC
#define MC 256
#endif
static inline __attribute__((always_inline)) void panels(const job_t *j, const int bf16) {
    for (int64_t m0 = j->m0; m0 < j->m; m0 += MC) /* rows MC at a time: their x stays in L2 over the panels */
    for (int64_t p = j->first; p < j->last; p++) {
        const int64_t cols = j->n - p * NR < NR ? j->n - p * NR : NR, m1 = m0 + MC < j->m ? m0 + MC : j->m;
        int64_t m = m0;
        for (; m + MR <= m1; m += MR) block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, MR, bf16);
        switch (m1 - m) { /* the last rows, with a block of their own height */
        case 1: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 1, bf16); break;
        case 2: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 2, bf16); break;
        case 3: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 3, bf16); break;
        case 4: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 4, bf16); break;
        case 5: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 5, bf16); break;
        case 6: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 6, bf16); break;
        case 7: block(j->x, j->x_stride, j->k, j->bp, p, j->y, j->y_stride, m, cols, 7, bf16); break;
        default: break;
        }
    }
}

static void *run_job(void *arg) {
    const job_t *j = arg;
    if (j->is_bf16)
        panels(j, 1);
    else
        panels(j, 0);
    return NULL;
}

/* y [M, N] (row stride y_stride) = x [M, K] (row stride x_stride) times the packed W^T.
 * Returns 0; -1 where this build cannot run the dtype (nlora_gemm_supported). */
int nlora_gemm(const void *x, int64_t x_stride, int64_t m, int64_t k, const void *bp, int64_t n, void *y,
               int64_t y_stride, int is_bf16, int num_threads) {
    if (!nlora_gemm_supported(is_bf16)) return -1;
    if (m <= 0 || n <= 0) return 0;
    const int64_t num_panels = (n + NR - 1) / NR;
    job_t jobs[MAX_JOBS];
    if (m >= ROW_SPLIT * num_threads) { /* prefill: each job all panels of its own rows (its own pages of y) */
        num_threads = clamp_jobs(num_threads, m / MR);
        for (int t = 0; t < num_threads; t++) {
            const int64_t r0 = m / MR * t / num_threads * MR, r1 = t + 1 == num_threads ? m : m / MR * (t + 1) / num_threads * MR;
            jobs[t] = (job_t){x, bp, y, x_stride, y_stride, r0, r1, k, n, 0, num_panels, is_bf16};
        }
    } else { /* decode: each job its own panels over all rows (each W panel read by one job) */
        num_threads = clamp_jobs(num_threads, num_panels);
        for (int t = 0; t < num_threads; t++)
            jobs[t] = (job_t){x, bp, y, x_stride, y_stride, 0, m, k, n, num_panels * t / num_threads,
                              num_panels * (t + 1) / num_threads, is_bf16};
    }
    parallel_jobs(run_job, jobs, sizeof jobs[0], num_threads);
    return 0;
}
