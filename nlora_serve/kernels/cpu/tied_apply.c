/* The Nyström-tied adapter path of one fused projection, for the CPU (DESIGN §1, §4).
 *
 * Semantics, for every token t whose tied slot s = slots[t] >= 0 and every module m of the fused
 * output y [T, sum of widths] (module m owns columns off[m] .. off[m] + width[m]):
 *
 *     z = y[t, off[m] : off[m] + r] - bias[m][:r]          (read before anything is added)
 *     u = scale[s] * N[m][s] z                              (r x r, fp32 arithmetic)
 *     y[t, off[m] : off[m] + width[m]] += B[m] u            (B[m] = W_m[:, :r])
 *
 * Tokens with s < 0 are untouched. B arrives as bt[m] = B^T [r, width[m]], fp32, contiguous;
 * N as the pool's dtype. In the bf16 variant y is widened to fp32, accumulated and rounded back
 * once (round to nearest even), as a bf16 GEMM with fp32 accumulation does.
 *
 * Layout of the work: tokens in chunks of CHUNK; for a chunk, every token's u is computed first
 * (so no z is read after an add), then each module's expand runs tile by tile over the columns:
 * a TILE-column slice of B^T (r x TILE fp32, L1-resident) is applied to every token of the chunk
 * with the accumulators in registers. The _mt entry points split the tokens over num_threads
 * jobs (parallel.h: torch's OpenMP workers, a ~1 µs hand-off), each a call of the op above on
 * disjoint rows of y.
 *
 * N[m] points at slot 0 of module m's N; slot s starts at N[m] + s * n_slot_stride (elements);
 * rows of one N are n_row_stride apart, columns contiguous.
 */
#include "adapter_tiles.h"
#include "amx.h"
#include "parallel.h"

#define CHUNK 32

#define DEFINE_TIED_APPLY(NAME, YT, NT, LOAD, STORE, NLOAD, TILE_FN, MIX_FN)                              \
int NAME(YT *y, int64_t num_tokens, int64_t y_row_stride, const int32_t *slots, const float *scale,       \
         int num_modules, const int64_t *off, const int64_t *width, const NT *const *n,                   \
         int64_t n_slot_stride, int64_t n_row_stride, int r, const float *const *bt,                      \
         const NT *const *bias) {                                                                          \
    float u[CHUNK][MAX_MODULES][MAX_RANK], acc[TILE];                                                     \
    int64_t rows[CHUNK];                                                                                  \
    if (r > MAX_RANK || num_modules > MAX_MODULES) return -1;                                            \
    int64_t t = 0;                                                                                        \
    while (t < num_tokens) {                                                                              \
        int count = 0;                                                                                    \
        for (; t < num_tokens && count < CHUNK; t++) {                                                    \
            if (t + PREFETCH_AHEAD < num_tokens)                                                          \
                prefetch_mix((const void *const *)n, sizeof(NT), num_modules, slots[t + PREFETCH_AHEAD],  \
                             n_slot_stride, n_row_stride, r);                                             \
            const int32_t s = slots[t];                                                                   \
            if (s < 0) continue;                                                                          \
            const YT *row = y + t * y_row_stride;                                                         \
            for (int m = 0; m < num_modules; m++) {                                                       \
                float z[MAX_RANK];                                                                        \
                for (int k = 0; k < r; k++) z[k] = LOAD(row[off[m] + k]) - (bias[m] ? NLOAD(bias[m][k]) : 0.0f); \
                const NT *nm = n[m] + (int64_t)s * n_slot_stride;                                         \
                MIX_FN(u[count][m], nm, n_row_stride, z, r, scale[s]);                                    \
            }                                                                                             \
            rows[count++] = t;                                                                            \
        }                                                                                                 \
        for (int m = 0; m < num_modules; m++) {                                                           \
            const int64_t w = width[m];                                                                   \
            for (int64_t j0 = 0; j0 < w; j0 += TILE) {                                                    \
                const int n_cols = w - j0 < TILE ? (int)(w - j0) : TILE;                                  \
                int c = 0;                                                                                \
                if (n_cols == TILE)                                                                       \
                    for (; c + 4 <= count; c += 4) {                                                      \
                        YT *d4[4];                                                                        \
                        const float *u4[4];                                                               \
                        for (int q = 0; q < 4; q++) {                                                     \
                            d4[q] = y + rows[c + q] * y_row_stride + off[m] + j0;                         \
                            u4[q] = u[c + q][m];                                                          \
                        }                                                                                 \
                        TILE_FN##_x4(d4, bt[m] + j0, w, u4, r);                                           \
                    }                                                                                     \
                if (n_cols == TILE)                                                                       \
                    for (; c + 2 <= count; c += 2)                                                        \
                        TILE_FN##_x2(y + rows[c] * y_row_stride + off[m] + j0,                            \
                                     y + rows[c + 1] * y_row_stride + off[m] + j0, bt[m] + j0, w,         \
                                     u[c][m], u[c + 1][m], r);                                            \
                for (; c < count; c++) {                                                                  \
                    YT *dst = y + rows[c] * y_row_stride + off[m] + j0;                                   \
                    if (n_cols == TILE) { TILE_FN(dst, bt[m] + j0, w, u[c][m], r); continue; }            \
                    for (int j = 0; j < n_cols; j++) acc[j] = LOAD(dst[j]);                               \
                    tail_fma(acc, bt[m] + j0, w, u[c][m], r, n_cols);                                     \
                    for (int j = 0; j < n_cols; j++) dst[j] = STORE(acc[j]);                              \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    return 0;                                                                                             \
}

DEFINE_TIED_APPLY(nlora_tied_apply_f32, float, float, F32_LOAD, F32_STORE, F32_LOAD, tile_f32, mix_f32)
DEFINE_TIED_APPLY(nlora_tied_apply_bf16, uint16_t, uint16_t, bf16_to_f32, f32_to_bf16, bf16_to_f32, tile_bf16,
                  mix_bf16)
/* fp32 rows with a bf16 pool's N and bias: a consumer op's fp32 copy of bf16 rows (tied_delta.h) */
DEFINE_TIED_APPLY(nlora_tied_apply_f32_bf16n, float, uint16_t, F32_LOAD, F32_STORE, bf16_to_f32, tile_f32, mix_bf16)

typedef struct {
    void *y;
    int64_t y_row_stride;
    const int32_t *slots;
    const float *scale;
    int num_modules, r, rc;
    const int64_t *off, *width;
    const void *const *n, *const *bias;
    int64_t n_slot_stride, n_row_stride, first, last;
    const void *const *bt; /* fp32 B^T, or for the AMX op B^T packed in bf16 pairs */
} tied_job_t;

/* NAME_mt: NAME over tokens split into num_threads jobs of disjoint rows; the first non-zero
 * return code of a job, else 0 */
#define DEFINE_TIED_APPLY_MT(NAME, YT, NT, BT)                                                          \
static void *NAME##_job(void *arg) {                                                                    \
    tied_job_t *j = arg;                                                                                \
    j->rc = NAME((YT *)j->y + j->first * j->y_row_stride, j->last - j->first, j->y_row_stride,          \
                 j->slots + j->first, j->scale, j->num_modules, j->off, j->width, (const NT *const *)j->n, \
                 j->n_slot_stride, j->n_row_stride, j->r, (const BT *const *)j->bt, (const NT *const *)j->bias); \
    return NULL;                                                                                        \
}                                                                                                       \
int NAME##_mt(YT *y, int64_t num_tokens, int64_t y_row_stride, const int32_t *slots, const float *scale, \
              int num_modules, const int64_t *off, const int64_t *width, const NT *const *n,            \
              int64_t n_slot_stride, int64_t n_row_stride, int r, const BT *const *bt,                  \
              const NT *const *bias, int num_threads) {                                                 \
    tied_job_t jobs[MAX_JOBS];                                                                          \
    const int parts = clamp_jobs(num_threads, num_tokens);                                              \
    for (int t = 0; t < parts; t++)                                                                     \
        jobs[t] = (tied_job_t){y, y_row_stride, slots, scale, num_modules, r, 0, off, width,            \
                               (const void *const *)n, (const void *const *)bias, n_slot_stride,        \
                               n_row_stride, num_tokens * t / parts, num_tokens * (t + 1) / parts,      \
                               (const void *const *)bt};                                                \
    parallel_jobs(NAME##_job, jobs, sizeof jobs[0], parts);                                             \
    for (int t = 0; t < parts; t++)                                                                     \
        if (jobs[t].rc) return jobs[t].rc;                                                              \
    return 0;                                                                                           \
}

DEFINE_TIED_APPLY_MT(nlora_tied_apply_f32, float, float, float)
DEFINE_TIED_APPLY_MT(nlora_tied_apply_bf16, uint16_t, uint16_t, float)

#ifdef NLORA_AMX
/* 1 when the AMX ops may run in this process (amx.h), else 0 */
int nlora_amx_init(void) { return amx_available(); }

/* nlora_tied_apply_bf16 with the expand on AMX tiles (amx.h), up to AMX_ROWS tokens at a time:
 * bp[m] is module m's B^T [rp, wp] packed in bf16 pairs (amx_expand_bf16), rp = r rounded up to
 * AMX_K, wp = width[m] rounded up to AMX_COLS. Each token's u is computed before any add. */
int nlora_tied_apply_bf16_amx(uint16_t *y, int64_t num_tokens, int64_t y_row_stride, const int32_t *slots,
                              const float *scale, int num_modules, const int64_t *off, const int64_t *width,
                              const uint16_t *const *n, int64_t n_slot_stride, int64_t n_row_stride, int r,
                              const uint16_t *const *bp, const uint16_t *const *bias) {
    float u[MAX_MODULES][AMX_ROWS][MAX_RANK];
    uint16_t uh[AMX_ROWS * MAX_RANK] __attribute__((aligned(64))), ul[AMX_ROWS * MAX_RANK] __attribute__((aligned(64)));
    uint16_t *dst[AMX_ROWS];
    int64_t rows[AMX_ROWS];
    if (r > MAX_RANK || num_modules > MAX_MODULES) return -1;
    const int rp = (r + AMX_K - 1) / AMX_K * AMX_K;
    amx_config_expand();
    for (int64_t t = 0; t < num_tokens;) {
        int count = 0;
        for (; t < num_tokens && count < AMX_ROWS; t++) {
            if (t + PREFETCH_AHEAD < num_tokens && slots[t + PREFETCH_AHEAD] >= 0) {
                prefetch_mix((const void *const *)n, 2, num_modules, slots[t + PREFETCH_AHEAD], n_slot_stride,
                             n_row_stride, r);
                for (int m = 0; m < num_modules; m++)
                    __builtin_prefetch(y + (t + PREFETCH_AHEAD) * y_row_stride + off[m], 0, 3);
            }
            const int32_t s = slots[t];
            if (s < 0) continue;
            const uint16_t *row = y + t * y_row_stride;
            for (int m = 0; m < num_modules; m++) {
                float z[MAX_RANK];
                for (int k = 0; k < r; k++) z[k] = bf16_to_f32(row[off[m] + k]) - (bias[m] ? bf16_to_f32(bias[m][k]) : 0.0f);
                mix_bf16(u[m][count], n[m] + (int64_t)s * n_slot_stride, n_row_stride, z, r, scale[s]);
            }
            rows[count++] = t;
        }
        for (int m = 0; m < num_modules && count; m++) {
            amx_split_u(uh, ul, u[m][0], MAX_RANK, count, r, rp);
            for (int c = 0; c < count; c++) dst[c] = y + rows[c] * y_row_stride + off[m];
            amx_expand_bf16(dst, count, uh, ul, rp, bp[m], width[m], (width[m] + AMX_COLS - 1) / AMX_COLS * AMX_COLS);
        }
    }
    _tile_release();
    return 0;
}
DEFINE_TIED_APPLY_MT(nlora_tied_apply_bf16_amx, uint16_t, uint16_t, uint16_t)
#else
int nlora_amx_init(void) { return 0; }
#endif
