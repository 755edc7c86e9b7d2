/* Running n jobs on n threads, for the native CPU ops.
 *
 * Built with -fopenmp (kernels/cpu/native.py tries that first), the jobs run in an OpenMP parallel
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
#include <stdlib.h>

/* the most jobs a native op splits its work into */
#define MAX_JOBS 64

/* jobs for `items` independent items on up to `threads` threads: 1 .. MAX_JOBS, never more than items */
static inline int clamp_jobs(int threads, int64_t items) {
    int n = threads < 1 ? 1 : threads > MAX_JOBS ? MAX_JOBS : threads;
    return items < n ? (items > 0 ? (int)items : 1) : n;
}

/* Scratch memory for a job: thread_scratch(slot, bytes) returns this thread's buffer `slot`
 * (0 .. SCRATCH_SLOTS - 1, numbered per source file) of at least `bytes`, 64-byte aligned, kept
 * for the thread's life and grown when a call needs more; NULL when out of memory. Its contents
 * do not survive a later call with the same slot. Why not malloc per call: in a serving process
 * every thread shares one malloc arena (engine/host_memory.py), and two jobs that start together
 * wait on its lock: the tied layer ops' decode time in a bf16 tied64 run went 0.85 -> 0.67 s with
 * these buffers (bench/RESULTS.md). Freed with the thread (a POSIX key's destructor). */
#define SCRATCH_SLOTS 4

typedef struct {
    void *buf[SCRATCH_SLOTS];
    size_t cap[SCRATCH_SLOTS];
} thread_scratch_t;

static pthread_key_t scratch_key __attribute__((unused));
static pthread_once_t scratch_once __attribute__((unused)) = PTHREAD_ONCE_INIT;

static inline void scratch_release(void *p) {
    thread_scratch_t *s = p;
    for (int i = 0; i < SCRATCH_SLOTS; i++) free(s->buf[i]);
    free(s);
}

static inline void scratch_key_init(void) { pthread_key_create(&scratch_key, scratch_release); }

static inline void *thread_scratch(int slot, size_t bytes) {
    pthread_once(&scratch_once, scratch_key_init);
    thread_scratch_t *s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL) return NULL;
        if (pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (bytes > s->cap[slot]) {
        free(s->buf[slot]);
        s->cap[slot] = 0;
        /* C11's aligned_alloc (posix_memalign is undeclared under -std=c11 in some translation
         * units, an error from GCC 14): the size must be a multiple of the alignment */
        const size_t rounded = (bytes + 63) / 64 * 64;
        s->buf[slot] = aligned_alloc(64, rounded ? rounded : 64);
        if (s->buf[slot] == NULL) return NULL;
        s->cap[slot] = rounded;
    }
    return s->buf[slot];
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
