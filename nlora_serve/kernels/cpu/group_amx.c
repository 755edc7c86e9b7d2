/* The group path (group_apply.c's semantics) in bf16 on AMX tiles (amx.h), for CPUs with AMX-BF16.
 *
 * Per family run (index sorted by family, as group_apply.c), up to AMX_ROWS tokens at a time:
 *
 *   shrink  z^T [r, tokens] = A[m][f][:r] . x^T: the tile's first operand is A's rows as the pool
 *           holds them ([R, dim_in], 32 entries of dim_in a tile), the second the tokens' x rows
 *           transposed into VNNI pairs once per block of tokens (shared by every module); fp32
 *           accumulation, even and odd K blocks in two tiles (two independent chains);
 *   mix     u = scale[s] * N[m][s] z per token (fp32, adapter_tiles.h);
 *   expand  y[t, module m] += B u: u in two bf16 parts (hi + lo, amx.h), B^T from the pool's own
 *           copy (pool_bt [F, R, width]) packed into VNNI pairs once per family and module
 *           (scratch), then amx_expand_bf16, each bf16 sum rounded once.
 *
 * Requires (NativeOps.plan_group checks): dim_in a multiple of 32, every module's rank width R a
 * multiple of 16 (the shrink reads A rows up to r rounded up to 16, all inside the family), and
 * the pool's B^T. Same arguments and return codes as nlora_group_apply_bf16.
 */
#include <stdlib.h>

#include "adapter_tiles.h"
#include "amx.h"
#include "group_mt.h"

#ifdef NLORA_AMX

/* xp[p][c] (32-bit pairs) = x[c] entries 2p, 2p + 1, for c < count, zero for count <= c < 16:
 * 16 x 16 blocks of 32-bit words through registers (transpose16 moves bits, not values) */
static void pack_x(uint32_t *xp, const uint16_t *const *x, int count, int64_t dim_in) {
    for (int64_t p0 = 0; p0 < dim_in / 2; p0 += 16) {
        vec16 m[16];
        for (int c = 0; c < 16; c++)
            if (c < count) memcpy(&m[c], (const uint32_t *)x[c] + p0, sizeof m[c]);
            else m[c] = splat(0.0f);
        transpose16(m);
        for (int i = 0; i < 16; i++) memcpy(xp + (p0 + i) * 16, &m[i], sizeof m[i]);
    }
}

/* bp = B^T [rp, wp] in VNNI pairs (amx_expand_bf16's layout) from rows k < r of bt (B^T, rows w
 * apart); zero for k >= r and for columns w .. wp - 1 */
static void pack_bt(uint16_t *bp, const uint16_t *bt, int64_t w, int64_t wp, int r, int rp) {
    for (int p = 0; p < rp / 2; p++) {
        const uint16_t *even = 2 * p < r ? bt + (int64_t)(2 * p) * w : NULL;
        const uint16_t *odd = 2 * p + 1 < r ? bt + (int64_t)(2 * p + 1) * w : NULL;
        for (int64_t j0 = 0; j0 < wp; j0 += 16) {
            const int n = w - j0 >= 16 ? 16 : (w - j0 > 0 ? (int)(w - j0) : 0);
            const __mmask16 mask = (__mmask16)((1u << n) - 1u);
            const __m512i lo = even ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, even + j0)) : _mm512_setzero_si512();
            const __m512i hi = odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, odd + j0)) : _mm512_setzero_si512();
            _mm512_storeu_si512(bp + ((int64_t)p * wp + j0) * 2, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* z[c][k] for k < r, c < 16 (rows of tokens past the block's count are garbage-free zeros) */
static void shrink_block(float (*z)[MAX_RANK], const uint32_t *xp, const uint16_t *a, int64_t a_row,
                         int64_t dim_in, int r) {
    float zt[2][AMX_ROWS][AMX_COLS] __attribute__((aligned(64)));
    for (int k0 = 0; k0 < r; k0 += 16) {
        _tile_zero(0);
        _tile_zero(1);
        const uint16_t *rows = a + (int64_t)k0 * a_row;
        int64_t i = 0;
        for (; i + 64 <= dim_in; i += 64) {
            _tile_loadd(4, rows + i, a_row * 2);
            _tile_loadd(5, xp + (i / 2) * 16, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(4, rows + i + 32, a_row * 2);
            _tile_loadd(5, xp + (i / 2 + 16) * 16, 64);
            _tile_dpbf16ps(1, 4, 5);
        }
        if (i < dim_in) {
            _tile_loadd(4, rows + i, a_row * 2);
            _tile_loadd(5, xp + (i / 2) * 16, 64);
            _tile_dpbf16ps(0, 4, 5);
        }
        _tile_stored(0, zt[0], AMX_COLS * 4);
        _tile_stored(1, zt[1], AMX_COLS * 4);
        for (int k = k0; k < r && k < k0 + 16; k++)
            for (int c = 0; c < AMX_ROWS; c++) z[c][k] = zt[0][k - k0][c] + zt[1][k - k0][c];
    }
}

int nlora_group_apply_bf16_amx(uint16_t *y, int64_t y_row, const uint16_t *x, int64_t x_row, int64_t dim_in,
                               const int64_t *index, int64_t num_index, const int32_t *slots,
                               const int32_t *families, const float *scale, int r, int num_modules,
                               const int64_t *off, const int64_t *width, const int64_t *rank_width,
                               const uint16_t *const *a, const int64_t *a_fam, const int64_t *a_row,
                               const uint16_t *const *n, const int64_t *n_slot, const int64_t *n_row,
                               const uint16_t *const *b, const int64_t *b_fam, const int64_t *b_row,
                               const uint16_t *const *pool_bt, const int64_t *bt_fam) {
    (void)b, (void)b_fam, (void)b_row;
    if (r > MAX_RANK || num_modules > MAX_MODULES || !pool_bt || dim_in % 32) return -1;
    for (int m = 0; m < num_modules; m++)
        if (rank_width[m] % 16) return -1;
    if (num_index == 0 || r == 0) return 0;
    const int rp = (r + AMX_K - 1) / AMX_K * AMX_K;
    int64_t wp[MAX_MODULES], bp_off[MAX_MODULES], sum_wp = 0;
    for (int m = 0; m < num_modules; m++) {
        wp[m] = (width[m] + AMX_COLS - 1) / AMX_COLS * AMX_COLS;
        bp_off[m] = sum_wp;
        sum_wp += rp * wp[m];
    }
    uint16_t *bp = thread_scratch(0, sizeof(uint16_t) * sum_wp);
    uint32_t *xp = thread_scratch(1, sizeof(uint32_t) * 16 * (dim_in / 2));
    if (!bp || !xp) return -2;
    float z[MAX_MODULES][AMX_ROWS][MAX_RANK], u[MAX_MODULES][AMX_ROWS][MAX_RANK];
    uint16_t uh[AMX_ROWS * MAX_RANK] __attribute__((aligned(64))), ul[AMX_ROWS * MAX_RANK] __attribute__((aligned(64)));
    const uint16_t *xr[AMX_ROWS];
    uint16_t *dst[AMX_ROWS];
    for (int64_t i0 = 0; i0 < num_index;) {
        const int32_t f = families[index[i0]];
        int64_t i1 = i0 + 1;
        while (i1 < num_index && families[index[i1]] == f) i1++;
        for (int m = 0; m < num_modules; m++)
            pack_bt(bp + bp_off[m], pool_bt[m] + f * bt_fam[m], width[m], wp[m], r, rp);
        for (int64_t c0 = i0; c0 < i1; c0 += AMX_ROWS) {
            const int count = i1 - c0 < AMX_ROWS ? (int)(i1 - c0) : AMX_ROWS;
            for (int c = 0; c < count; c++) xr[c] = x + index[c0 + c] * x_row;
            pack_x(xp, xr, count, dim_in);
            amx_config_shrink();
            for (int m = 0; m < num_modules; m++) shrink_block(z[m], xp, a[m] + f * a_fam[m], a_row[m], dim_in, r);
            amx_config_expand();
            for (int m = 0; m < num_modules; m++) {
                for (int c = 0; c < count; c++) {
                    const int64_t t = index[c0 + c];
                    const int32_t s = slots[t];
                    mix_bf16(u[m][c], n[m] + s * n_slot[m], n_row[m], z[m][c], r, scale[s]);
                    dst[c] = y + t * y_row + off[m];
                }
                amx_split_u(uh, ul, u[m][0], MAX_RANK, count, r, rp);
                amx_expand_bf16(dst, count, uh, ul, rp, bp + bp_off[m], width[m], wp[m]);
            }
        }
        i0 = i1;
    }
    _tile_release();
    return 0;
}

DEFINE_GROUP_APPLY_MT(nlora_group_apply_bf16_amx, uint16_t)

#endif
