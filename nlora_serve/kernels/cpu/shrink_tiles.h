/* The shrink z = A x of the native adapter ops (group_apply.c, tied_apply.c): r rows of A
 * against a few tokens' input rows at a time, fp32 accumulation; bf16 through AVX512-BF16 dot
 * products where the CPU has them. Also how each op reads a token's x row (as is, or widened). */
#ifndef NLORA_SHRINK_TILES_H
#define NLORA_SHRINK_TILES_H

#include "adapter_tiles.h"

#define TB 4 /* tokens per pass over an A slice */
#define KB 4 /* A rows per pass */

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
            __asm__("" : "+v"(xv[t])); /* in a register: GCC folds a load into every FMA */           \
        }                                                                                               \
        for (int kk = 0; kk < NK; kk++) {                                                               \
            vec16 av = LOAD16(a + (k0 + kk) * a_row + i);                                               \
            __asm__("" : "+v"(av));                                                                     \
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

#endif
