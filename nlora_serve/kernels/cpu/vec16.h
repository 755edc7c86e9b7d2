/* 16-lane fp32 vectors (GCC vector extensions: one AVX-512 register, two AVX2 ones) and bf16
 * conversions shared by the native CPU ops. bf16 -> fp32 is exact (the high half of the bits);
 * fp32 -> bf16 rounds to nearest even and keeps NaN a quiet NaN. */
#ifndef NLORA_VEC16_H
#define NLORA_VEC16_H

#include <stdint.h>
#include <string.h>

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* Keeps a vector in a register (an empty asm that claims to change it), so GCC does not fold its
 * load into every FMA that uses it. AVX-512 only: without it a vec16 spans two registers, which
 * the "v" constraint cannot name (the build failed on AVX2-only CPUs), and it is only a hint. */
#ifdef __AVX512F__
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

static inline vec16 splat(float x) { return (vec16){0} + x; }

/* x in all 16 lanes as one broadcast (splat's "0 + x" is a scalar add first: GCC may not fold it,
 * since 0 + x is not x for x = -0) */
static inline vec16 bcast16(float x) { return (vec16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline vec16 load16(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline vec16 load16_bf16(const uint16_t *p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    vec16 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
/* one VCVTNEPS2BF16: round to nearest even, NaN kept a quiet NaN, as the portable version below
 * (which costs ~10 vector ops); it also flushes fp32 denormals (below 1.2e-38) to zero */
static inline void store16_bf16(uint16_t *p, vec16 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh((__m512)v));
}
#else
static inline void store16_bf16(uint16_t *p, vec16 v) {
    u32x16 bits;
    memcpy(&bits, &v, sizeof bits);
    u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    u32x16 quiet_nan = (bits >> 16) | 0x40u;
    u32x16 is_nan = (u32x16)((bits & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN */
    u32x16 out = (quiet_nan & is_nan) | (rounded & ~is_nan);
    u16x16 h = __builtin_convertvector(out, u16x16);
    memcpy(p, &h, sizeof h);
}
#endif

/* sum of the 16 lanes by halving (a shuffle tree that stays in registers) */
static inline float hsum16(vec16 v) {
    vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* lane-wise yes where mask is all ones, else no */
static inline vec16 select16(i32x16 mask, vec16 yes, vec16 no) {
    i32x16 a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    a = (a & mask) | (b & ~mask);
    memcpy(&yes, &a, sizeof yes);
    return yes;
}

/* largest of the 16 lanes (lane 0 of a four-round max with rotations; all lanes hold it) */
static inline float hmax16(vec16 v) {
    vec16 r = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v = select16(v > r, v, r);
    r = __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v = select16(v > r, v, r);
    r = __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v = select16(v > r, v, r);
    r = __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    v = select16(v > r, v, r);
    return v[0];
}

/* e^x, 16 lanes: x = n ln2 + f, |f| <= ln2/2, e^f by a degree-6 Taylor polynomial (relative error
 * < 2e-7), 2^n through the exponent bits; 0 below -87 (underflow, -inf included), x clamped at 88
 * above (e^88 < FLT_MAX). Shared by the attention's softmax and the MLP's SiLU. */
static inline vec16 exp16(vec16 x) {
    const i32x16 below = x < -87.0f;
    x = select16(below, splat(-87.0f), x);
    x = select16(x > 88.0f, splat(88.0f), x);
    const vec16 shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vec16 n = (x * 1.44269504f + shifter) - shifter;
    vec16 f = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    vec16 p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
    vec16 scale;
    memcpy(&scale, &e, sizeof scale);
    return select16(below, splat(0.0f), p * scale);
}

/* 16 x 16 fp32 transpose in registers: four rounds of two-source shuffles, each swapping the
 * off-diagonal b x b blocks of every 2b x 2b block (b = 8, 4, 2, 1) */
#define PAIR(I, J, LO, HI)                                                                              \
    do {                                                                                                \
        const vec16 p = m[I], q = m[J];                                                                 \
        m[I] = __builtin_shufflevector(p, q, LO);                                                       \
        m[J] = __builtin_shufflevector(p, q, HI);                                                       \
    } while (0)
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31

static inline void transpose16(vec16 *m) {
    PAIR(0, 8, LO8, HI8); PAIR(1, 9, LO8, HI8); PAIR(2, 10, LO8, HI8); PAIR(3, 11, LO8, HI8);
    PAIR(4, 12, LO8, HI8); PAIR(5, 13, LO8, HI8); PAIR(6, 14, LO8, HI8); PAIR(7, 15, LO8, HI8);
    PAIR(0, 4, LO4, HI4); PAIR(1, 5, LO4, HI4); PAIR(2, 6, LO4, HI4); PAIR(3, 7, LO4, HI4);
    PAIR(8, 12, LO4, HI4); PAIR(9, 13, LO4, HI4); PAIR(10, 14, LO4, HI4); PAIR(11, 15, LO4, HI4);
    PAIR(0, 2, LO2, HI2); PAIR(1, 3, LO2, HI2); PAIR(4, 6, LO2, HI2); PAIR(5, 7, LO2, HI2);
    PAIR(8, 10, LO2, HI2); PAIR(9, 11, LO2, HI2); PAIR(12, 14, LO2, HI2); PAIR(13, 15, LO2, HI2);
    PAIR(0, 1, LO1, HI1); PAIR(2, 3, LO1, HI1); PAIR(4, 5, LO1, HI1); PAIR(6, 7, LO1, HI1);
    PAIR(8, 9, LO1, HI1); PAIR(10, 11, LO1, HI1); PAIR(12, 13, LO1, HI1); PAIR(14, 15, LO1, HI1);
}

#endif
