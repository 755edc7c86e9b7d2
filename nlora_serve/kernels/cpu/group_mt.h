/* The group op's multi-threaded entry points (group_apply.c, group_amx.c): the index split into
 * jobs of disjoint tokens, one per thread (parallel.h). */
#ifndef NLORA_GROUP_MT_H
#define NLORA_GROUP_MT_H

#include "parallel.h"

typedef struct {
    void *y;
    const void *x;
    int64_t y_row, x_row, dim_in, first, last;
    const int64_t *index, *off, *width, *rank_width, *a_fam, *a_row, *n_slot, *n_row, *b_fam, *b_row, *bt_fam;
    const int32_t *slots, *families;
    const float *scale;
    int r, num_modules, rc;
    const void *const *a, *const *n, *const *b, *const *pool_bt;
} group_job_t;

/* NAME_mt: NAME over index[0 : num_index] split into num_threads jobs (disjoint tokens; a family
 * cut in two has its B transposed by both jobs, unless the pool keeps B^T); the first non-zero
 * return code, else 0 */
#define DEFINE_GROUP_APPLY_MT(NAME, T)                                                                  \
static void *NAME##_job(void *arg) {                                                                    \
    group_job_t *j = arg;                                                                               \
    j->rc = NAME((T *)j->y, j->y_row, (const T *)j->x, j->x_row, j->dim_in, j->index + j->first,        \
                 j->last - j->first, j->slots, j->families, j->scale, j->r, j->num_modules, j->off,     \
                 j->width, j->rank_width, (const T *const *)j->a, j->a_fam, j->a_row,                   \
                 (const T *const *)j->n, j->n_slot, j->n_row, (const T *const *)j->b, j->b_fam, j->b_row, \
                 (const T *const *)j->pool_bt, j->bt_fam);                                              \
    return NULL;                                                                                        \
}                                                                                                       \
int NAME##_mt(T *y, int64_t y_row, const T *x, int64_t x_row, int64_t dim_in,                          \
              const int64_t *index, int64_t num_index, const int32_t *slots, const int32_t *families,  \
              const float *scale, int r, int num_modules, const int64_t *off, const int64_t *width,    \
              const int64_t *rank_width, const T *const *a, const int64_t *a_fam, const int64_t *a_row, \
              const T *const *n, const int64_t *n_slot, const int64_t *n_row,                          \
              const T *const *b, const int64_t *b_fam, const int64_t *b_row, const T *const *pool_bt,   \
              const int64_t *bt_fam, int num_threads) {                                                 \
    group_job_t jobs[MAX_JOBS];                                                                         \
    const int parts = clamp_jobs(num_threads, num_index);                                               \
    for (int t = 0; t < parts; t++)                                                                     \
        jobs[t] = (group_job_t){y, x, y_row, x_row, dim_in, num_index * t / parts,                      \
                                num_index * (t + 1) / parts, index, off, width, rank_width, a_fam, a_row, \
                                n_slot, n_row, b_fam, b_row, bt_fam, slots, families, scale, r, num_modules, \
                                0, (const void *const *)a, (const void *const *)n, (const void *const *)b, \
                                (const void *const *)pool_bt};                                          \
    parallel_jobs(NAME##_job, jobs, sizeof jobs[0], parts);                                             \
    for (int t = 0; t < parts; t++)                                                                     \
        if (jobs[t].rc) return jobs[t].rc;                                                              \
    return 0;                                                                                           \
}

#endif
