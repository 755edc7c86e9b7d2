/* Shared pieces of the native adapter ops (tied_apply.c, group_apply.c): the rank-r expand of a
 * TILE-column slice into one or two y rows with the accumulators in registers, its scalar tail,
 * and the r x r mix in fp32. */
#ifndef NLORA_ADAPTER_TILES_H
#define NLORA_ADAPTER_TILES_H

#include "vec16.h"

#define MAX_RANK 128
#define MAX_MODULES 4
#define TILE 64

#define F32_LOAD(v) (v)
#define F32_STORE(v) (v)

/* dst[0:TILE] += sum_k u[k] * bt[k * w + j] over k < r, bt already offset to the tile; the four
 * accumulators stay in registers across k (LOAD16/STORE16 widen and narrow bf16 rows of y,
 * BLOAD16 loads 16 entries of a B^T row: fp32, or bf16 widened) */
#define DEFINE_TILE(NAME, YT, LOAD16, STORE16, BT, BLOAD16)                                             \
static inline void NAME(YT *restrict dst, const BT *restrict bt, int64_t w, const float *restrict u, int r) { \
    vec16 a0 = LOAD16(dst), a1 = LOAD16(dst + 16), a2 = LOAD16(dst + 32), a3 = LOAD16(dst + 48);       \
    for (int k = 0; k < r; k++) {                                                                       \
        const float uk = u[k];                                                                          \
        const BT *b = bt + k * w;                                                                       \
        a0 += uk * BLOAD16(b);                                                                          \
        a1 += uk * BLOAD16(b + 16);                                                                     \
        a2 += uk * BLOAD16(b + 32);                                                                     \
        a3 += uk * BLOAD16(b + 48);                                                                     \
    }                                                                                                   \
    STORE16(dst, a0); STORE16(dst + 16, a1); STORE16(dst + 32, a2); STORE16(dst + 48, a3);              \
}                                                                                                       \
/* the same for two tokens at once: each B^T load feeds two FMAs, eight independent chains */          \
static inline void NAME##_x2(YT *restrict d0, YT *restrict d1, const BT *restrict bt, int64_t w,        \
                             const float *restrict u0, const float *restrict u1, int r) {               \
    vec16 a0 = LOAD16(d0), a1 = LOAD16(d0 + 16), a2 = LOAD16(d0 + 32), a3 = LOAD16(d0 + 48);           \
    vec16 c0 = LOAD16(d1), c1 = LOAD16(d1 + 16), c2 = LOAD16(d1 + 32), c3 = LOAD16(d1 + 48);           \
    for (int k = 0; k < r; k++) {                                                                       \
        const float p = u0[k], q = u1[k];                                                               \
        const BT *b = bt + k * w;                                                                       \
        vec16 b0 = BLOAD16(b), b1 = BLOAD16(b + 16), b2 = BLOAD16(b + 32), b3 = BLOAD16(b + 48);        \
        /* held in registers: else GCC folds each load into both tokens' FMAs (twice the loads) */    \
        KEEP_IN_REGISTER(b0); KEEP_IN_REGISTER(b1);                                                     \
        KEEP_IN_REGISTER(b2); KEEP_IN_REGISTER(b3);                                                     \
        a0 += p * b0; a1 += p * b1; a2 += p * b2; a3 += p * b3;                                         \
        c0 += q * b0; c1 += q * b1; c2 += q * b2; c3 += q * b3;                                         \
    }                                                                                                   \
    STORE16(d0, a0); STORE16(d0 + 16, a1); STORE16(d0 + 32, a2); STORE16(d0 + 48, a3);                  \
    STORE16(d1, c0); STORE16(d1 + 16, c1); STORE16(d1 + 32, c2); STORE16(d1 + 48, c3);                  \
}                                                                                                       \
/* four tokens at once: each B^T load feeds four FMAs (16 accumulators + 4 loads in 32 registers) */  \
static inline void NAME##_x4(YT *const *d, const BT *restrict bt, int64_t w, const float *const *u, int r) { \
    vec16 a[4][4];                                                                                      \
    for (int t = 0; t < 4; t++)                                                                         \
        for (int v = 0; v < 4; v++) a[t][v] = LOAD16(d[t] + 16 * v);                                    \
    for (int k = 0; k < r; k++) {                                                                       \
        const BT *b = bt + k * w;                                                                       \
        vec16 b0 = BLOAD16(b), b1 = BLOAD16(b + 16), b2 = BLOAD16(b + 32), b3 = BLOAD16(b + 48);        \
        KEEP_IN_REGISTER(b0); KEEP_IN_REGISTER(b1);                                                     \
        KEEP_IN_REGISTER(b2); KEEP_IN_REGISTER(b3);                                                     \
        for (int t = 0; t < 4; t++) {                                                                   \
            const float p = u[t][k];                                                                    \
            a[t][0] += p * b0; a[t][1] += p * b1; a[t][2] += p * b2; a[t][3] += p * b3;                 \
        }                                                                                               \
    }                                                                                                   \
    for (int t = 0; t < 4; t++)                                                                         \
        for (int v = 0; v < 4; v++) STORE16(d[t] + 16 * v, a[t][v]);                                    \
}

DEFINE_TILE(tile_f32, float, load16, store16, float, load16)
DEFINE_TILE(tile_bf16, uint16_t, load16_bf16, store16_bf16, float, load16)
/* bf16 y and a bf16 B^T (the LoRA pool's own transposed copy, group_apply.c) */
DEFINE_TILE(tile_bf16_bt16, uint16_t, load16_bf16, store16_bf16, uint16_t, load16_bf16)

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

/* acc[0:n] += sum_k u[k] * bt[k * w + j] (a tile's last columns; BLOAD reads one B^T entry) */
#define DEFINE_TAIL_FMA(NAME, BT, BLOAD)                                                                \
static inline void NAME(float *restrict acc, const BT *restrict bt, int64_t w, const float *restrict u, int r, int n) { \
    for (int k = 0; k < r; k++) {                                                                       \
        const float uk = u[k];                                                                          \
        const BT *restrict b = bt + k * w;                                                              \
        for (int j = 0; j < n; j++) acc[j] += uk * BLOAD(b[j]);                                         \
    }                                                                                                   \
}

DEFINE_TAIL_FMA(tail_fma, float, F32_LOAD)
DEFINE_TAIL_FMA(tail_fma_bt16, uint16_t, bf16_to_f32)

DEFINE_MIX(mix_f32, float, F32_LOAD, load16)
DEFINE_MIX(mix_bf16, uint16_t, bf16_to_f32, load16_bf16)

/* Tokens ahead in the loop whose N is prefetched: in a decode step every token has its own
 * tenant, and its N (r x r per module) is cold, since the base GEMMs streamed the weights since
 * the last call; perf put about a fifth of the tied op's samples on those loads */
#define PREFETCH_AHEAD 4

/* Prefetches slot s's N of every module (elem bytes an entry; rows n_row_stride entries apart,
 * contiguous or not) into L1, up to PREFETCH_BYTES of each (at larger ranks the mix's own
 * arithmetic hides the loads); nothing for s < 0 */
#define PREFETCH_BYTES 4096
static inline void prefetch_mix(const void *const *n, int elem, int num_modules, int32_t s, int64_t n_slot_stride,
                                int64_t n_row_stride, int r) {
    if (s < 0) return;
    const int64_t row_bytes = (int64_t)r * elem;
    const int64_t rows = row_bytes * r <= PREFETCH_BYTES ? r : (PREFETCH_BYTES + row_bytes - 1) / row_bytes;
    for (int m = 0; m < num_modules; m++) {
        const char *base = (const char *)n[m] + (int64_t)s * n_slot_stride * elem;
        if (n_row_stride == r) { /* one contiguous block */
            for (int64_t b = 0; b < row_bytes * rows; b += 64) __builtin_prefetch(base + b, 0, 3);
            __builtin_prefetch(base + row_bytes * rows - 1, 0, 3);
            continue;
        }
        for (int64_t i = 0; i < rows; i++) {
            const char *row = base + (int64_t)i * n_row_stride * elem;
            for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
            __builtin_prefetch(row + row_bytes - 1, 0, 3);
        }
    }
}

#endif
