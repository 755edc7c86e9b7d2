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
 * with the accumulators in registers. Single-threaded: at decode sizes the engine's OpenMP pool
 * costs more in fork/join than these FLOPs take.
 *
 * N[m] points at slot 0 of module m's N; slot s starts at N[m] + s * n_slot_stride (elements);
 * rows of one N are n_row_stride apart, columns contiguous.
 */
#include "vec16.h"

#define MAX_RANK 128
#define MAX_MODULES 4
#define CHUNK 32
#define TILE 64

/* dst[0:TILE] += sum_k u[k] * bt[k * w + j] over k < r, bt already offset to the tile; the four
 * accumulators stay in registers across k (LOAD16/STORE16 widen and narrow bf16 rows) */
#define DEFINE_TILE(NAME, YT, LOAD16, STORE16)                                                          \
static inline void NAME(YT *restrict dst, const float *restrict bt, int64_t w, const float *restrict u, int r) { \
    vec16 a0 = LOAD16(dst), a1 = LOAD16(dst + 16), a2 = LOAD16(dst + 32), a3 = LOAD16(dst + 48);       \
    for (int k = 0; k < r; k++) {                                                                       \
        const float uk = u[k];                                                                          \
        const float *b = bt + k * w;                                                                    \
        a0 += uk * load16(b);                                                                           \
        a1 += uk * load16(b + 16);                                                                      \
        a2 += uk * load16(b + 32);                                                                      \
        a3 += uk * load16(b + 48);                                                                      \
    }                                                                                                   \
    STORE16(dst, a0); STORE16(dst + 16, a1); STORE16(dst + 32, a2); STORE16(dst + 48, a3);              \
}                                                                                                       \
/* the same for two tokens at once: each B^T load feeds two FMAs, eight independent chains */          \
static inline void NAME##_x2(YT *restrict d0, YT *restrict d1, const float *restrict bt, int64_t w,     \
                             const float *restrict u0, const float *restrict u1, int r) {               \
    vec16 a0 = LOAD16(d0), a1 = LOAD16(d0 + 16), a2 = LOAD16(d0 + 32), a3 = LOAD16(d0 + 48);           \
    vec16 c0 = LOAD16(d1), c1 = LOAD16(d1 + 16), c2 = LOAD16(d1 + 32), c3 = LOAD16(d1 + 48);           \
    for (int k = 0; k < r; k++) {                                                                       \
        const float p = u0[k], q = u1[k];                                                               \
        const float *b = bt + k * w;                                                                    \
        const vec16 b0 = load16(b), b1 = load16(b + 16), b2 = load16(b + 32), b3 = load16(b + 48);      \
        a0 += p * b0; a1 += p * b1; a2 += p * b2; a3 += p * b3;                                         \
        c0 += q * b0; c1 += q * b1; c2 += q * b2; c3 += q * b3;                                         \
    }                                                                                                   \
    STORE16(d0, a0); STORE16(d0 + 16, a1); STORE16(d0 + 32, a2); STORE16(d0 + 48, a3);                  \
    STORE16(d1, c0); STORE16(d1 + 16, c1); STORE16(d1 + 32, c2); STORE16(d1 + 48, c3);                  \
}

DEFINE_TILE(tile_f32, float, load16, store16)
DEFINE_TILE(tile_bf16, uint16_t, load16_bf16, store16_bf16)

/* u[i] = scale * sum_k N[i, k] z[k], i, k < r (rows n_row_stride apart). A scalar dot product is
 * one dependent FMA chain (4 cycles a step); 16 lanes at a time, then one horizontal sum, when
 * r is a multiple of 16, else four interleaved scalar chains. */
#define DEFINE_MIX(NAME, NT, LOAD, LOAD16)                                                              \
static inline void NAME(float *restrict u, const NT *restrict n, int64_t n_row_stride,                 \
                        const float *restrict z, int r, float scale) {                                  \
    for (int i = 0; i < r; i++) {                                                                       \
        const NT *row = n + i * n_row_stride;                                                           \
        float dot;                                                                                      \
        if (r % 16 == 0) {                                                                              \
            vec16 acc = LOAD16(row) * load16(z);                                                        \
            for (int k = 16; k < r; k += 16) acc += LOAD16(row + k) * load16(z + k);                    \
            dot = hsum16(acc);                                                                          \
        } else {                                                                                        \
            float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                                      \
            int k = 0;                                                                                  \
            for (; k + 4 <= r; k += 4)                                                                  \
                for (int q = 0; q < 4; q++) p[q] += LOAD(row[k + q]) * z[k + q];                        \
            for (; k < r; k++) p[0] += LOAD(row[k]) * z[k];                                             \
            dot = (p[0] + p[1]) + (p[2] + p[3]);                                                        \
        }                                                                                               \
        u[i] = scale * dot;                                                                             \
    }                                                                                                   \
}

static inline void tail_fma(float *restrict acc, const float *restrict bt, int64_t w, const float *restrict u, int r, int n) {
    for (int k = 0; k < r; k++) {
        const float uk = u[k];
        const float *restrict b = bt + k * w;
        for (int j = 0; j < n; j++) acc[j] += uk * b[j];
    }
}

#define DEFINE_TIED_APPLY(NAME, YT, NT, LOAD, STORE, TILE_FN, MIX_FN)                                                      \
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
            const int32_t s = slots[t];                                                                   \
            if (s < 0) continue;                                                                          \
            const YT *row = y + t * y_row_stride;                                                         \
            for (int m = 0; m < num_modules; m++) {                                                       \
                float z[MAX_RANK];                                                                        \
                for (int k = 0; k < r; k++) z[k] = LOAD(row[off[m] + k]) - (bias[m] ? LOAD(bias[m][k]) : 0.0f); \
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

#define F32_LOAD(v) (v)
#define F32_STORE(v) (v)

DEFINE_MIX(mix_f32, float, F32_LOAD, load16)
DEFINE_MIX(mix_bf16, uint16_t, bf16_to_f32, load16_bf16)

DEFINE_TIED_APPLY(nlora_tied_apply_f32, float, float, F32_LOAD, F32_STORE, tile_f32, mix_f32)
DEFINE_TIED_APPLY(nlora_tied_apply_bf16, uint16_t, uint16_t, bf16_to_f32, f32_to_bf16, tile_bf16, mix_bf16)
