/* A tied projection's delta handed to the op that consumes the projection's output.
 *
 * The tied op (tied_apply.c) reads and writes the whole fused output y once more after the base
 * GEMM: at prefill sizes y is tens of MB, so that pass costs what the memory moves (a 2,048-token
 * fp32 gate/up output is 25 MB read and written back). The op that reads y next (SiLU · up, the
 * residual add + RMSNorm) can add the delta itself: for each chunk of TIED_CHUNK rows it copies
 * them into an fp32 scratch that stays in L1/L2, runs the tied op there (the same code, the same
 * semantics: z = row[off + :r] − bias, y += s · B N z) and reads the scratch instead of y. y itself
 * is left as the GEMM wrote it, so it is read once. Rows are widened to fp32 and not rounded back
 * before the consumer reads them: one rounding less than the unfused bf16 path.
 */
#ifndef NLORA_TIED_DELTA_H
#define NLORA_TIED_DELTA_H

#include <stdint.h>
#include <string.h>

#include "adapter_tiles.h"

/* rows of y copied and adapted at a time: a chunk of gate/up rows (2 × 1536 fp32) is 96 KB */
#define TIED_CHUNK 8

/* The tied op's arguments (tied_apply.c) that one fused projection fixes (kernels/cpu/native.py
 * TiedProjection), and those one step fixes (its batch): y's rows are the consumer's input rows */
typedef struct {
    int num_modules, r, n_bf16;  /* n_bf16: N and bias are bf16 (else fp32) */
    const int64_t *off, *width;  /* [num_modules] columns of each module in the row */
    const void *const *n;        /* [num_modules] slot 0 of each module's N */
    const void *const *bias;     /* [num_modules] bias[:r] or NULL */
    int64_t n_slot_stride, n_row_stride;
    const float *const *bt;      /* [num_modules] B^T [r, width] fp32 contiguous */
} tied_plan_t;

typedef struct {
    const int32_t *slots; /* [T] tied slot per row (−1: none) */
    const float *scale;   /* [S] scaling per slot */
} tied_step_t;

/* a projection's deferred delta: the plan and the step it is for (one pointer for the C call) */
typedef struct {
    const tied_plan_t *plan;
    const tied_step_t *step;
} tied_delta_t;

int nlora_tied_apply_f32(float *y, int64_t num_tokens, int64_t y_row_stride, const int32_t *slots, const float *scale,
                         int num_modules, const int64_t *off, const int64_t *width, const float *const *n,
                         int64_t n_slot_stride, int64_t n_row_stride, int r, const float *const *bt,
                         const float *const *bias);
int nlora_tied_apply_f32_bf16n(float *y, int64_t num_tokens, int64_t y_row_stride, const int32_t *slots,
                               const float *scale, int num_modules, const int64_t *off, const int64_t *width,
                               const uint16_t *const *n, int64_t n_slot_stride, int64_t n_row_stride, int r,
                               const float *const *bt, const uint16_t *const *bias);

/* Rows [t0, t1) of src (width columns, rows src_stride elements apart, bf16 or fp32) with the tied
 * delta added, into scratch [t1 - t0, width] fp32, when one of them has a tied slot: returns 1
 * (read the scratch), 0 (no tied row: read src), or the tied op's error code (< 0). The N of the
 * first PREFETCH_AHEAD rows after t1 (up to last, the caller's end) is prefetched for the next
 * chunk: the tied op prefetches ahead only within its own rows. */
static inline int tied_delta_rows(const tied_delta_t *delta, const void *src, int64_t src_stride, int src_bf16,
                                  int64_t t0, int64_t t1, int64_t last, int64_t width, float *scratch) {
    const tied_plan_t *d = delta->plan;
    const int32_t *slots = delta->step->slots;
    for (int64_t t = t1; t < last && t < t1 + PREFETCH_AHEAD; t++)
        prefetch_mix(d->n, d->n_bf16 ? 2 : 4, d->num_modules, slots[t], d->n_slot_stride, d->n_row_stride, d->r);
    int any = 0;
    for (int64_t t = t0; t < t1 && !any; t++) any = slots[t] >= 0;
    if (!any) return 0;
    for (int64_t t = t0; t < t1; t++) {
        float *dst = scratch + (t - t0) * width;
        if (src_bf16) {
            const uint16_t *row = (const uint16_t *)src + t * src_stride;
            int64_t i = 0;
            for (; i + 16 <= width; i += 16) store16(dst + i, load16_bf16(row + i));
            for (; i < width; i++) dst[i] = bf16_to_f32(row[i]);
        } else {
            memcpy(dst, (const float *)src + t * src_stride, sizeof(float) * width);
        }
    }
    const float *scale = delta->step->scale;
    const int rc = d->n_bf16
        ? nlora_tied_apply_f32_bf16n(scratch, t1 - t0, width, slots + t0, scale, d->num_modules, d->off, d->width,
                                     (const uint16_t *const *)d->n, d->n_slot_stride, d->n_row_stride, d->r, d->bt,
                                     (const uint16_t *const *)d->bias)
        : nlora_tied_apply_f32(scratch, t1 - t0, width, slots + t0, scale, d->num_modules, d->off, d->width,
                               (const float *const *)d->n, d->n_slot_stride, d->n_row_stride, d->r, d->bt,
                               (const float *const *)d->bias);
    return rc ? (rc < 0 ? rc : -rc) : 1;
}

#endif
