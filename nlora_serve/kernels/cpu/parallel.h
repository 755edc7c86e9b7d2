/* Running n jobs on n threads, for the native CPU ops.
 *
 * Built with -fopenmp (kernels/native.py tries that first), the jobs run in an OpenMP parallel
 * region. The process already has torch's OpenMP runtime loaded (libgomp.so.1, the same soname),
 * so the region runs on torch's own worker threads: they are usually still spinning after the
 * last GEMM, so a hand-off costs about a microsecond, and no second set of threads competes with
 * them for the cores. Without OpenMP, every call starts and joins POSIX threads (~30-70 µs a
 * call on this box, measured), which is why that path is only the fallback.
 */
#ifndef NLORA_PARALLEL_H
#define NLORA_PARALLEL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* the most jobs a native op splits its work into */
#define MAX_JOBS 64

/* jobs for `items` independent items on up to `threads` threads: 1 .. MAX_JOBS, never more than items */
static inline int clamp_jobs(int threads, int64_t items) {
    int n = threads < 1 ? 1 : threads > MAX_JOBS ? MAX_JOBS : threads;
    return items < n ? (items > 0 ? (int)items : 1) : n;
}

/* Calls fn(jobs + t * job_size) for t in [0, n), on up to n threads; returns when all are done. */
static inline void parallel_jobs(void *(*fn)(void *), void *jobs, size_t job_size, int n) {
    char *at = jobs;
    if (n <= 1) {
        if (n == 1) fn(at);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(n)
    for (int t = 0; t < n; t++) fn(at + (size_t)t * job_size);
#else
    pthread_t threads[MAX_JOBS];
    int started = 1;
    for (int t = 1; t < n && t < MAX_JOBS; t++, started++)
        if (pthread_create(&threads[t], NULL, fn, at + (size_t)t * job_size) != 0) break;
    for (int t = started; t < n; t++) fn(at + (size_t)t * job_size); /* no thread: run it here */
    fn(at);
    for (int t = 1; t < started; t++) pthread_join(threads[t], NULL);
#endif
}

#endif
