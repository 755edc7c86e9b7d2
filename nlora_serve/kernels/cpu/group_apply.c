/* The group path (plain LoRA / NLoRA / IntTune families) of one fused projection, for the CPU
 * (DESIGN §1, §4).
 *
 * Semantics, for every group token t = index[i] (slot s = slots[t] >= 0, family f = families[t])
 * and every module m of the fused output y [T, sum of widths] (module m owns columns
 * off[m] .. off[m] + width[m]; all modules read the same input row x[t]):
 *
 *     z = A[m][f][:r] x[t]                                  (shrink: r dots of length dim_in)
 *     u = scale[s] * N[m][s][:r, :r] z                      (mix, r x r)
 *     y[t, off[m] : off[m] + width[m]] += B[m][f][:, :r] u  (expand)
 *
 * all in fp32 arithmetic. Only the listed tokens' rows are written; nothing of a family or slot
 * that no listed token uses is read. In the bf16 variant y is widened to fp32, accumulated and
 * rounded back once (round to nearest even), as a bf16 GEMM with fp32 accumulation does.
 *
 * index lists the group tokens sorted by family (AdapterBatch.group_index), so each family's
 * tokens come as one run. Per run, the expand reads B^T: the pool's own copy (pool_bt [F, R,
 * width] per module, which the CPU LoRA pool writes with each slot; see POOL_BT_MAX_RUN for
 * when), else each module's B[m][f] [out, R] transposed once into an fp32
 * scratch B^T [r16, width] (16 x 16 register transposes; r16 = r rounded up to 16). Then the
 * run's tokens go through in chunks of CHUNK: the shrink loads each vector of an A row once for
 * up to four tokens (four rows x four tokens = 16 register accumulators; bf16 through AVX512-BF16
 * dot products where the CPU has them), the mix runs per token, and the expand applies each B^T
 * tile to four tokens at a time (adapter_tiles.h). Single-threaded, as tied_apply.c. Measured
 * split at T = 64, 8 families, before the pool kept B^T (perf, fp32): shrink ~40%, expand ~30%,
 * B transposes ~25%.
 *
 * Pool addressing, per module m (strides in elements, columns contiguous):
 *   A[m][f] row k  = a[m] + f * a_fam[m] + k * a_row[m]          (A pool [F, R, dim_in])
 *   B[m][f] row j  = b[m] + f * b_fam[m] + j * b_row[m]          (B pool [F, out, R])
 *   B^T[m][f] row k = pool_bt[m] + f * bt_fam[m] + k * width[m]  (pool_bt [F, R, width]; NULL: none)
 *   N[m][s] row i  = n[m] + s * n_slot[m] + i * n_row[m]         (N pool [S, R, R])
 * R = rank_width[m] (entries beyond a used slot's rank are zero up to R, SiteWeights' contract).
 *
 * Returns 0, -1 when r or num_modules exceeds the static buffers, -2 when scratch memory fails.
 */
#include <stdlib.h>

#include "adapter_tiles.h"
#include "group_mt.h"

#define CHUNK 32
/* fp32 pools: every run reads the pool's B^T as it is. bf16 pools: a family's run of fewer tokens
 * reads it, widened on every load (decode, where a transpose per run and call cost ~40% of the
 * op); a longer run transposes B into fp32 scratch once and reuses it (prefill, where the widening
 * loads measured slower than the one transpose) */
#define POOL_BT_MAX_RUN 32
#define TB 4 /* tokens per pass over an A slice */
#define KB 4 /* A rows per pass */

/* bt[k * w + j] = B[j, k] for k < rows, j < w (B rows b_row apart). Whole 16 x 16 blocks go
 * through registers where the pool's rows hold 16 more entries (k0 + 16 <= R), the rest scalar. */
#define DEFINE_TRANSPOSE(NAME, BT, LOAD, LOAD16)                                                        \
static void NAME(float *restrict bt, const BT *restrict b, int64_t b_row, int64_t w, int rows, int R) { \
    int k0 = 0;                                                                                         \
    for (; k0 < rows && k0 + 16 <= R; k0 += 16) {                                                       \
        int64_t j0 = 0;                                                                                 \
        for (; j0 + 16 <= w; j0 += 16) {                                                                \
            vec16 m[16];                                                                                \
            for (int i = 0; i < 16; i++) m[i] = LOAD16(b + (j0 + i) * b_row + k0);                      \
            transpose16(m);                                                                             \
            for (int i = 0; i < 16; i++) store16(bt + (k0 + i) * w + j0, m[i]);                         \
        }                                                                                               \
        for (; j0 < w; j0++)                                                                            \
            for (int k = k0; k < k0 + 16; k++) bt[k * w + j0] = LOAD(b[j0 * b_row + k]);               \
    }                                                                                                   \
    for (int64_t j = 0; j < w && k0 < rows; j++)                                                        \
        for (int k = k0; k < rows; k++) bt[k * w + j] = LOAD(b[j * b_row + k]);                         \
}

/* z[t][k0 + kk] = A[k0 + kk] . x[t] for kk < NK, t < NT: each 16-wide A slice is loaded once and
 * used for every token; one horizontal sum per (row, token), the last dim_in % 16 scalar. */
#define DEFINE_SHRINK(NAME, AT, LOAD, LOAD16, NK, NT)                                                   \
static inline void NAME(float (*restrict z)[MAX_RANK], const AT *restrict a, int64_t a_row,            \
                        const float *const *restrict x, int64_t dim_in, int k0) {                      \
    vec16 acc[NK][NT];                                                                                  \
    for (int kk = 0; kk < NK; kk++) for (int t = 0; t < NT; t++) acc[kk][t] = splat(0.0f);             \
    int64_t i = 0;                                                                                      \
    for (; i + 16 <= dim_in; i += 16) {                                                                 \
        vec16 xv[NT];                                                                                   \
        for (int t = 0; t < NT; t++) {                                                                  \
            xv[t] = load16(x[t] + i);                                                                   \
            KEEP_IN_REGISTER(xv[t]); /* in a register: GCC folds a load into every FMA */             \
        }                                                                                               \
        for (int kk = 0; kk < NK; kk++) {                                                               \
            vec16 av = LOAD16(a + (k0 + kk) * a_row + i);                                               \
            KEEP_IN_REGISTER(av);                                                                       \
            for (int t = 0; t < NT; t++) acc[kk][t] += av * xv[t];                                      \
        }                                                                                               \
    }                                                                                                   \
    for (int kk = 0; kk < NK; kk++)                                                                     \
        for (int t = 0; t < NT; t++) {                                                                  \
            float s = hsum16(acc[kk][t]);                                                               \
            for (int64_t j = i; j < dim_in; j++) s += LOAD(a[(k0 + kk) * a_row + j]) * x[t][j];         \
            z[t][k0 + kk] = s;                                                                          \
        }                                                                                               \
}

DEFINE_TRANSPOSE(transpose_f32, float, F32_LOAD, load16)
DEFINE_TRANSPOSE(transpose_bf16, uint16_t, bf16_to_f32, load16_bf16)

/* z for `count` tokens, rows k < r: four tokens per pass, four A rows per pass */
#define DEFINE_SHRINK_LOOPS(P, AT, XT)                                                                  \
static void P(float (*restrict z)[MAX_RANK], const AT *restrict a, int64_t a_row,                     \
              const XT *const *restrict x, int count, int64_t dim_in, int r) {                        \
    int c = 0;                                                                                          \
    for (; c + TB <= count; c += TB) {                                                                  \
        int k = 0;                                                                                      \
        for (; k + KB <= r; k += KB) P##_4x4(z + c, a, a_row, x + c, dim_in, k);                        \
        for (; k < r; k++) P##_1x4(z + c, a, a_row, x + c, dim_in, k);                                  \
    }                                                                                                   \
    for (; c < count; c++) {                                                                            \
        int k = 0;                                                                                      \
        for (; k + KB <= r; k += KB) P##_4x1(z + c, a, a_row, x + c, dim_in, k);                        \
        for (; k < r; k++) P##_1x1(z + c, a, a_row, x + c, dim_in, k);                                  \
    }                                                                                                   \
}

#define DEFINE_SHRINKS(P, AT, LOAD, LOAD16)                                                             \
DEFINE_SHRINK(P##_4x4, AT, LOAD, LOAD16, 4, 4)                                                          \
DEFINE_SHRINK(P##_4x1, AT, LOAD, LOAD16, 4, 1)                                                          \
DEFINE_SHRINK(P##_1x4, AT, LOAD, LOAD16, 1, 4)                                                          \
DEFINE_SHRINK(P##_1x1, AT, LOAD, LOAD16, 1, 1)                                                          \
DEFINE_SHRINK_LOOPS(P, AT, float)

DEFINE_SHRINKS(shrink_f32, float, F32_LOAD, load16)

#ifdef __AVX512BF16__
#include <immintrin.h>
/* bf16 A and x as they are: vdpbf16ps multiplies 32 bf16 pairs exactly and adds them in fp32, so
 * neither side is widened and one instruction does two FMAs' work per lane. */
#define DEFINE_SHRINK_DP(NAME, NK, NT)                                                                  \
static inline void NAME(float (*restrict z)[MAX_RANK], const uint16_t *restrict a, int64_t a_row,      \
                        const uint16_t *const *restrict x, int64_t dim_in, int k0) {                   \
    __m512 acc[NK][NT];                                                                                 \
    for (int kk = 0; kk < NK; kk++) for (int t = 0; t < NT; t++) acc[kk][t] = _mm512_setzero_ps();     \
    int64_t i = 0;                                                                                      \
    for (; i + 32 <= dim_in; i += 32) {                                                                 \
        __m512bh xv[NT];                                                                                \
        for (int t = 0; t < NT; t++) {                                                                  \
            xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + i);                                             \
            __asm__("" : "+v"(xv[t]));                                                                  \
        }                                                                                               \
        for (int kk = 0; kk < NK; kk++) {                                                               \
            __m512bh av = (__m512bh)_mm512_loadu_si512(a + (k0 + kk) * a_row + i);                      \
            __asm__("" : "+v"(av));                                                                     \
            for (int t = 0; t < NT; t++) acc[kk][t] = _mm512_dpbf16_ps(acc[kk][t], av, xv[t]);          \
        }                                                                                               \
    }                                                                                                   \
    for (int kk = 0; kk < NK; kk++)                                                                     \
        for (int t = 0; t < NT; t++) {                                                                  \
            float s = hsum16((vec16)acc[kk][t]);                                                        \
            for (int64_t j = i; j < dim_in; j++)                                                        \
                s += bf16_to_f32(a[(k0 + kk) * a_row + j]) * bf16_to_f32(x[t][j]);                     \
            z[t][k0 + kk] = s;                                                                          \
        }                                                                                               \
}
DEFINE_SHRINK_DP(shrink_bf16_4x4, 4, 4)
DEFINE_SHRINK_DP(shrink_bf16_4x1, 4, 1)
DEFINE_SHRINK_DP(shrink_bf16_1x4, 1, 4)
DEFINE_SHRINK_DP(shrink_bf16_1x1, 1, 1)
DEFINE_SHRINK_LOOPS(shrink_bf16, uint16_t, uint16_t)
#define BF16_XT uint16_t
#define x_row_bf16 x_row_as_is
#else
DEFINE_SHRINKS(shrink_bf16, uint16_t, bf16_to_f32, load16_bf16)
#define BF16_XT float
#endif

/* dst[c][0:w] += B u[c] for count rows, B^T in bt [r, w] (BT: fp32, or bf16 when the pool keeps its
 * own B^T): column tiles of TILE, four rows per tile load, then two, then one; the last w % TILE
 * columns scalar */
#define DEFINE_EXPAND(NAME, YT, LOAD, STORE, TILE_FN, BT, TAIL_FMA)                                     \
static void NAME(YT *const *dst, float (*u)[MAX_RANK], int count, const BT *bt, int64_t w, int r) {    \
    float acc[TILE];                                                                                    \
    for (int64_t j0 = 0; j0 < w; j0 += TILE) {                                                          \
        const int n_cols = w - j0 < TILE ? (int)(w - j0) : TILE;                                        \
        int c = 0;                                                                                      \
        if (n_cols == TILE) {                                                                           \
            for (; c + 4 <= count; c += 4) {                                                            \
                YT *d4[4] = {dst[c] + j0, dst[c + 1] + j0, dst[c + 2] + j0, dst[c + 3] + j0};           \
                const float *u4[4] = {u[c], u[c + 1], u[c + 2], u[c + 3]};                              \
                TILE_FN##_x4(d4, bt + j0, w, u4, r);                                                    \
            }                                                                                           \
            for (; c + 2 <= count; c += 2)                                                              \
                TILE_FN##_x2(dst[c] + j0, dst[c + 1] + j0, bt + j0, w, u[c], u[c + 1], r);              \
            if (c < count) TILE_FN(dst[c] + j0, bt + j0, w, u[c], r);                                   \
            continue;                                                                                   \
        }                                                                                               \
        for (; c < count; c++) {                                                                        \
            for (int j = 0; j < n_cols; j++) acc[j] = LOAD(dst[c][j0 + j]);                             \
            TAIL_FMA(acc, bt + j0, w, u[c], r, n_cols);                                                 \
            for (int j = 0; j < n_cols; j++) dst[c][j0 + j] = STORE(acc[j]);                            \
        }                                                                                               \
    }                                                                                                   \
}

DEFINE_EXPAND(expand_f32, float, F32_LOAD, F32_STORE, tile_f32, float, tail_fma)
DEFINE_EXPAND(expand_bf16, uint16_t, bf16_to_f32, f32_to_bf16, tile_bf16, float, tail_fma)
DEFINE_EXPAND(expand_bf16_bt16, uint16_t, bf16_to_f32, f32_to_bf16, tile_bf16_bt16, uint16_t, tail_fma_bt16)

/* x row of each token as the shrink reads it: the row itself, or (bf16 without AVX512-BF16) a
 * widened fp32 copy in scratch */
#define DEFINE_X_ROW_AS_IS(NAME, T)                                                                     \
static inline const T *NAME(const T *x, int64_t x_row, int64_t t, int64_t dim_in, float *scratch) {     \
    (void)dim_in; (void)scratch;                                                                        \
    return x + t * x_row;                                                                               \
}
DEFINE_X_ROW_AS_IS(x_row_f32, float)
#ifdef __AVX512BF16__
DEFINE_X_ROW_AS_IS(x_row_as_is, uint16_t)
#else

static inline const float *x_row_bf16(const uint16_t *x, int64_t x_row, int64_t t, int64_t dim_in, float *scratch) {
    const uint16_t *src = x + t * x_row;
    int64_t i = 0;
    for (; i + 16 <= dim_in; i += 16) store16(scratch + i, load16_bf16(src + i));
    for (; i < dim_in; i++) scratch[i] = bf16_to_f32(src[i]);
    return scratch;
}
#endif

#define DEFINE_GROUP_APPLY(NAME, T, XT, XROW, TRANSPOSE, SHRINK, MIX, EXPAND, EXPAND_POOL_BT)           \
int NAME(T *y, int64_t y_row, const T *x, int64_t x_row, int64_t dim_in,                               \
         const int64_t *index, int64_t num_index, const int32_t *slots, const int32_t *families,       \
         const float *scale, int r, int num_modules, const int64_t *off, const int64_t *width,         \
         const int64_t *rank_width, const T *const *a, const int64_t *a_fam, const int64_t *a_row,     \
         const T *const *n, const int64_t *n_slot, const int64_t *n_row,                               \
         const T *const *b, const int64_t *b_fam, const int64_t *b_row,                                \
         const T *const *pool_bt, const int64_t *bt_fam) {                                             \
    if (r > MAX_RANK || num_modules > MAX_MODULES) return -1;                                           \
    if (num_index == 0 || r == 0) return 0;                                                             \
    int64_t sum_w = 0, bt_off[MAX_MODULES];                                                             \
    for (int m = 0; m < num_modules; m++) { bt_off[m] = sum_w; sum_w += width[m]; }                     \
    const int r16 = (r + 15) & ~15;                                                                     \
    /* each module's B^T [r16, width] in fp32, for the runs that do not read the pool's own */         \
    const int widened_bt = sizeof(T) != sizeof(float); /* the pool's B^T needs widening loads */      \
    const int scratch = !pool_bt || (widened_bt && num_index >= POOL_BT_MAX_RUN);                       \
    float *bt = scratch ? thread_scratch(0, sizeof(float) * r16 * sum_w) : NULL;                        \
    const int widen = sizeof(XT) != sizeof(T); /* x rows widened into scratch */                        \
    float *xs = widen ? thread_scratch(1, sizeof(float) * CHUNK * dim_in) : NULL;                       \
    if ((scratch && !bt) || (widen && !xs)) return -2;                                                  \
    float z[CHUNK][MAX_RANK], u[CHUNK][MAX_RANK];                                                       \
    const XT *xr[CHUNK];                                                                                \
    T *dst[CHUNK];                                                                                      \
    for (int64_t i0 = 0; i0 < num_index;) {                                                             \
        const int32_t f = families[index[i0]];                                                          \
        int64_t i1 = i0 + 1;                                                                            \
        while (i1 < num_index && families[index[i1]] == f) i1++;                                        \
        const int own_bt = pool_bt && (!widened_bt || i1 - i0 < POOL_BT_MAX_RUN);                       \
        for (int m = 0; m < num_modules && !own_bt; m++)                                                \
            TRANSPOSE(bt + r16 * bt_off[m], b[m] + f * b_fam[m], b_row[m], width[m], r, rank_width[m]);   \
        /* chunks outside, modules inside: a chunk's x rows are widened once for every module */       \
        for (int64_t c0 = i0; c0 < i1; c0 += CHUNK) {                                                   \
            const int count = i1 - c0 < CHUNK ? (int)(i1 - c0) : CHUNK;                                 \
            for (int c = 0; c < count; c++)                                                             \
                xr[c] = XROW(x, x_row, index[c0 + c], dim_in, xs ? xs + c * dim_in : NULL);            \
            for (int m = 0; m < num_modules; m++) {                                                     \
                SHRINK(z, a[m] + f * a_fam[m], a_row[m], xr, count, dim_in, r);                         \
                for (int c = 0; c < count; c++) {                                                       \
                    const int64_t t = index[c0 + c];                                                    \
                    const int32_t s = slots[t];                                                         \
                    MIX(u[c], n[m] + s * n_slot[m], n_row[m], z[c], r, scale[s]);                       \
                    dst[c] = y + t * y_row + off[m];                                                    \
                }                                                                                       \
                if (own_bt) EXPAND_POOL_BT(dst, u, count, pool_bt[m] + f * bt_fam[m], width[m], r);     \
                else EXPAND(dst, u, count, bt + r16 * bt_off[m], width[m], r);                          \
            }                                                                                           \
        }                                                                                               \
        i0 = i1;                                                                                        \
    }                                                                                                   \
    return 0;                                                                                           \
}

DEFINE_GROUP_APPLY(nlora_group_apply_f32, float, float, x_row_f32, transpose_f32, shrink_f32, mix_f32, expand_f32,
                   expand_f32)
DEFINE_GROUP_APPLY(nlora_group_apply_bf16, uint16_t, BF16_XT, x_row_bf16, transpose_bf16, shrink_bf16, mix_bf16,
                   expand_bf16, expand_bf16_bt16)

DEFINE_GROUP_APPLY_MT(nlora_group_apply_f32, float)
DEFINE_GROUP_APPLY_MT(nlora_group_apply_bf16, uint16_t)
