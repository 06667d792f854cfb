/* Vector math and a thread split shared by the CPU kernels (scan_cpu.c, causal_conv_cpu.c): GCC/Clang vector
 * extensions (a vector maps onto whatever SIMD the machine has; AVX-512 instructions where there), pthreads.
 */
#ifndef NAS_VEC_MATH_H
#define NAS_VEC_MATH_H
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L /* posix_memalign and pthreads under a strict CC="gcc -std=c99" too */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256
/* LOG2E and SOFTPLUS_THRESHOLD come from nas/ops/scan_torch.py, on the compiler's command line */
#if !defined(LOG2E) || !defined(SOFTPLUS_THRESHOLD)
#error "compile with -DLOG2E=... -DSOFTPLUS_THRESHOLD=... (nas/ops/scan_cpu.py does)"
#endif

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

/* n bytes aligned to 64, or NULL (free() releases them) */
static void *alloc64(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, n ? n : 64) == 0 ? p : NULL;
}

/* One vector is one register: 64 bytes with AVX-512, else 32 (AVX2; narrower SIMD takes two). A vector wider
 * than the machine's registers compiles to spills and element-by-element compares, several times slower. */
#ifdef __AVX512F__
#define VBYTES 64
#else
#define VBYTES 32
#endif
#define WF (VBYTES / 4) /* float lanes */
#define WD (VBYTES / 8) /* double lanes */
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));

static const vf ZERO_F = {0};

static inline vf select_vf(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* 2^f for |f| <= 1/2 by its Taylor series to degree 7 (relative error about 1e-7) */
static inline vf exp2_frac_vf(vf f) {
    vf p = ZERO_F + 1.5252733804059841e-5f;
    p = p * f + 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    return p * f + 1.0f;
}

#ifdef __AVX512F__
#include <immintrin.h>
/* 2^x = 2^n 2^f with n = round(x); scalef does 2^n with the right underflow to 0 and overflow to inf.
 * max/min return their second operand for a NaN, so NaN stays NaN. */
static inline vf exp2_vf(vf x) {
    __m512 xc = _mm512_min_ps(_mm512_set1_ps(129.0f), _mm512_max_ps(_mm512_set1_ps(-151.0f), (__m512)x));
    __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (vf)_mm512_scalef_ps((__m512)exp2_frac_vf((vf)_mm512_sub_ps(xc, n)), n);
}

/* dst[i * 16 + l] = src[l * stride + i] for i, l < 16: sixteen vector loads, a transpose in registers,
 * sixteen vector stores (scalar copies cost several times more). */
static inline void transpose16_f32(const float *src, int64_t stride, float *dst) {
    __m512 r[16], t[16];
    for (int l = 0; l < 16; l++) r[l] = _mm512_loadu_ps(src + l * stride);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xDD);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * 16, r[i]);
}
#define TRANSPOSE16_F32 transpose16_f32
#else
/* 2^x = 2^f 2^a 2^b with n = round(x) = a + b, a = floor(n / 2): each half fits the exponent bits for any
 * n in [-126, 129], so 2^x is right up to 2^128 (exclusive) and the last product overflows to inf from there,
 * as the float result must. Below -126 it returns 0; NaN stays NaN. */
static inline vf exp2_vf(vf x) {
    vf xc = select_vf(x < -126.0f, ZERO_F - 126.0f, x);
    xc = select_vf(xc > 129.0f, ZERO_F + 129.0f, xc);
    vf n = (xc + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    vi ni = __builtin_convertvector(n, vi), a = ni >> 1;
    vf r = exp2_frac_vf(xc - n) * (vf)((a + 127) << 23) * (vf)((ni - a + 127) << 23);
    r = select_vf(x < -126.0f, ZERO_F, r);
    return select_vf(x != x, x, r);
}
#endif

/* e^x (relative error about 1e-6 at |x| = 20, from rounding x log2(e)) */
static inline vf exp_vf(vf x) { return exp2_vf(x * (float)LOG2E); }

/* sigmoid(x) and e = exp(-|x|), without overflow for either sign */
static inline vf sigmoid_vf(vf x, vf *e_out) {
    vf ax = select_vf(x < 0.0f, -x, x), e = exp_vf(-ax), r = 1.0f / (1.0f + e);
    *e_out = e;
    return select_vf(x < 0.0f, e * r, r);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), x itself above the threshold 20 (PyTorch's); its
 * derivative (sigmoid(x), 1 above the threshold) in *grad. log1p(e) = 2 atanh(e / (2 + e)), whose
 * series converges fast for e in [0, 1] (|s| <= 1/3), to degree 13 (relative error about 1e-8). */
static inline vf softplus_vf(vf x, vf *grad) {
    vf e, sg = sigmoid_vf(x, &e);
    vf s = e / (2.0f + e), s2 = s * s;
    vf p = ZERO_F + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    vf sp = select_vf(x > 0.0f, x, ZERO_F) + 2.0f * s * p;
    vi above = x > (float)SOFTPLUS_THRESHOLD;
    *grad = select_vf(above, ZERO_F + 1.0f, sg);
    return select_vf(above, x, sp);
}

/* double (the float64 path, for gradcheck): libm lane by lane */
typedef double vd __attribute__((vector_size(VBYTES)));

static inline vd exp2_vd(vd x) {
    vd r = {0};
    for (int l = 0; l < WD; l++) r[l] = exp2(x[l]);
    return r;
}

static inline vd sigmoid_vd(vd x, vd *e_out) {
    vd r = {0}, e = {0};
    for (int l = 0; l < WD; l++) {
        e[l] = exp(-fabs(x[l]));
        r[l] = x[l] < 0 ? e[l] / (1 + e[l]) : 1 / (1 + e[l]);
    }
    *e_out = e;
    return r;
}

static inline vd softplus_vd(vd x, vd *grad) {
    vd e, sg = sigmoid_vd(x, &e), r = {0};
    for (int l = 0; l < WD; l++) {
        int above = x[l] > SOFTPLUS_THRESHOLD;
        r[l] = above ? x[l] : fmax(x[l], 0) + log1p(e[l]);
        (*grad)[l] = above ? 1 : sg[l];
    }
    return r;
}


/* Runs fn(ctx, first, end) over [0, items) in `threads` contiguous ranges, one per thread (the calling thread
 * takes the first). fn returns 0, or -1 if its memory ran out; so does this. */
typedef int (*range_fn)(void *ctx, int64_t first, int64_t end);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t first, end;
    int status;
} range_job;

static void *run_range_job(void *arg) {
    range_job *r = arg;
    r->status = r->fn(r->ctx, r->first, r->end);
    return NULL;
}

static int parallel_for(int64_t items, int threads, range_fn fn, void *ctx) {
    if (threads > items) threads = (int)items;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    range_job r[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        r[i] = (range_job){fn, ctx, items * i / threads, items * (i + 1) / threads, 0};
        if (i > 0) started[i] = pthread_create(&tid[i], NULL, run_range_job, &r[i]) == 0;
    }
    for (int i = 1; i < threads; i++)
        if (!started[i]) run_range_job(&r[i]); /* no thread to be had: run it here */
    run_range_job(&r[0]);
    int status = r[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(tid[i], NULL);
        if (r[i].status) status = r[i].status;
    }
    return status;
}
#endif
