/* Intel AMX (Advanced Matrix Extensions) pieces of the native bf16 adapter ops.
 *
 * Why: in a bf16 decode step the adapter ops' rank-r expands run on AVX-512 FMAs at ~22 G MAC/s
 * (bench/adapter_ops.py, bench/RESULTS.md "The tenants' share, op by op"), while the base GEMMs
 * run on AMX tiles through oneDNN. One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one
 * into 16 x 16 fp32 accumulators (8,192 MACs); the expand's rank-16 contraction then costs two of
 * them per 16 x 16 block of y, and the op's remaining cost is reading and rounding y.
 *
 * Precision: an AMX tile multiplies bf16 values. B (= W[:, :r] for the tied path) is bf16 already,
 * but u (the mixed rank vector, fp32) is not, so it goes in as two bf16 parts, u = hi + lo with
 * hi = bf16(u), lo = bf16(u - hi): both are multiplied exactly and summed in fp32, so u is carried
 * to ~2^-16 relative (bf16 alone: 2^-9) for twice the tile products. y's rows are then widened,
 * the fp32 delta added and each sum rounded once to bf16, as the AVX-512 path does.
 *
 * Use: amx_available() once per process (the kernel must grant the tile state: Linux >= 5.16,
 * arch_prctl ARCH_REQ_XCOMP_PERM); amx_config_expand() on each thread before its tile ops and
 * _tile_release() after. Built only where the compiler targets AMX (-march=native on a CPU with
 * AMX-BF16); elsewhere NLORA_AMX is undefined and the ops keep their AVX-512 / portable paths.
 */
#ifndef NLORA_AMX_H
#define NLORA_AMX_H

#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define NLORA_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>

#include "vec16.h"

#define AMX_ROWS 16 /* tokens per tile */
#define AMX_COLS 16 /* fp32 columns per accumulator tile */
#define AMX_K 16    /* bf16 entries of u per A tile (r padded to a multiple of 16) */

long syscall(long number, ...); /* <unistd.h> declares it only under _GNU_SOURCE; -std=c11 is strict */

/* the tile state's permission, once per process: 1 when granted */
static inline int amx_available(void) {
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_tilecfg;

/* tmm0..tmm3: accumulators [16 tokens, 16 columns] fp32 of four column blocks side by side (a
 * TDPBF16PS has ~16 cycles of latency: four independent ones keep the unit busy); tmm4 / tmm5: u's
 * hi / lo parts [16 tokens, AMX_K] bf16; tmm6 / tmm7: B^T [AMX_K, 16 columns] in the VNNI pair
 * layout (AMX_K / 2 rows of 16 pairs), alternating */
static inline void amx_config_expand(void) {
    amx_tilecfg cfg = {0};
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) cfg.rows[t] = AMX_ROWS, cfg.colsb[t] = AMX_COLS * 4;
    cfg.rows[4] = AMX_ROWS, cfg.colsb[4] = AMX_K * 2;
    cfg.rows[5] = AMX_ROWS, cfg.colsb[5] = AMX_K * 2;
    cfg.rows[6] = AMX_K / 2, cfg.colsb[6] = AMX_COLS * 4;
    cfg.rows[7] = AMX_K / 2, cfg.colsb[7] = AMX_COLS * 4;
    _tile_loadconfig(&cfg);
}

/* The shrink's tiles: tmm0 / tmm1: accumulators of z^T [16 ranks, 16 tokens] fp32 for even / odd
 * K blocks (two independent chains); tmm4: A [16 ranks, 32 of dim_in] bf16, straight from the pool;
 * tmm5: x^T [32 of dim_in, 16 tokens] in the VNNI pair layout (16 rows of 16 pairs) */
static inline void amx_config_shrink(void) {
    amx_tilecfg cfg = {0};
    cfg.palette_id = 1;
    cfg.rows[0] = AMX_ROWS, cfg.colsb[0] = AMX_COLS * 4;
    cfg.rows[1] = AMX_ROWS, cfg.colsb[1] = AMX_COLS * 4;
    cfg.rows[4] = AMX_ROWS, cfg.colsb[4] = 64;
    cfg.rows[5] = 16, cfg.colsb[5] = AMX_ROWS * 4;
    _tile_loadconfig(&cfg);
}

/* uh[i][k] = bf16(u[i][k]), ul[i][k] = bf16(u[i][k] - uh[i][k]) for i < count, k < r; zeros for
 * k in [r, rp) and for the rows count .. AMX_ROWS - 1 (rp = r rounded up to AMX_K); 16 lanes at a
 * time (VCVTNEPS2BF16 rounds to nearest even) */
static inline void amx_split_u(uint16_t *uh, uint16_t *ul, const float *u, int64_t u_row, int count, int r,
                               int rp) {
    for (int i = 0; i < AMX_ROWS; i++)
        for (int k = 0; k < rp; k += 16) {
            const int n = i < count ? (r - k < 16 ? (r - k > 0 ? r - k : 0) : 16) : 0;
            const __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), u + i * u_row + k);
            const __m256bh hi = _mm512_cvtneps_pbh(v);
            const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hi), 16));
            _mm256_storeu_si256((__m256i *)(uh + i * rp + k), (__m256i)hi);
            _mm256_storeu_si256((__m256i *)(ul + i * rp + k), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, back)));
        }
}

/* dst[i][j0 : j0 + n] += c[i][0 : n] for i < count, bf16 rows widened, each sum rounded once */
static inline void amx_add_rows(uint16_t *const *dst, int count, int64_t j0, const float (*c)[AMX_COLS], int n) {
    const __mmask16 mask = (__mmask16)((1u << n) - 1u);
    for (int i = 0; i < count; i++) {
        uint16_t *d = dst[i] + j0;
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, d));
        const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)), _mm512_load_ps(c[i]));
        _mm256_mask_storeu_epi16(d, mask, (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

/* accumulator tile C (a constant) += (tmm4 + tmm5) . the B^T block at column j0, through tile BT */
#define AMX_BLOCK(C, BT, bp, k0, wp, j0)                                                                \
    do {                                                                                                \
        _tile_loadd(BT, (bp) + (int64_t)(k0) * (wp) + (j0) * 2, (wp) * 4);                              \
        _tile_dpbf16ps(C, 4, BT);                                                                       \
        _tile_dpbf16ps(C, 5, BT);                                                                       \
    } while (0)

/* dst[i][0:w] += (uh[i] + ul[i]) . B^T for i < count (bf16 rows, each sum rounded once); bp is
 * B^T [rp, wp] packed in VNNI pairs: bp[(k / 2) * wp * 2 + j * 2 + k % 2] = B^T[k][j], zero for
 * k >= r or j >= w (wp = w rounded up to AMX_COLS). Four column blocks at a time, then one. */
static inline void amx_expand_bf16(uint16_t *const *dst, int count, const uint16_t *uh, const uint16_t *ul,
                                   int rp, const uint16_t *bp, int64_t w, int64_t wp) {
    float c[4][AMX_ROWS][AMX_COLS] __attribute__((aligned(64)));
    int64_t j0 = 0;
    for (; j0 + 4 * AMX_COLS <= w; j0 += 4 * AMX_COLS) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int k0 = 0; k0 < rp; k0 += AMX_K) {
            _tile_loadd(4, uh + k0, rp * 2);
            _tile_loadd(5, ul + k0, rp * 2);
            AMX_BLOCK(0, 6, bp, k0, wp, j0);
            AMX_BLOCK(1, 7, bp, k0, wp, j0 + AMX_COLS);
            AMX_BLOCK(2, 6, bp, k0, wp, j0 + 2 * AMX_COLS);
            AMX_BLOCK(3, 7, bp, k0, wp, j0 + 3 * AMX_COLS);
        }
        _tile_stored(0, c[0], AMX_COLS * 4); _tile_stored(1, c[1], AMX_COLS * 4);
        _tile_stored(2, c[2], AMX_COLS * 4); _tile_stored(3, c[3], AMX_COLS * 4);
        for (int b = 0; b < 4; b++) amx_add_rows(dst, count, j0 + b * AMX_COLS, c[b], AMX_COLS);
    }
    for (; j0 < w; j0 += AMX_COLS) {
        _tile_zero(0);
        for (int k0 = 0; k0 < rp; k0 += AMX_K) {
            _tile_loadd(4, uh + k0, rp * 2);
            _tile_loadd(5, ul + k0, rp * 2);
            AMX_BLOCK(0, 6, bp, k0, wp, j0);
        }
        _tile_stored(0, c[0], AMX_COLS * 4);
        amx_add_rows(dst, count, j0, c[0], w - j0 < AMX_COLS ? (int)(w - j0) : AMX_COLS);
    }
}

#endif
#endif
