/* lowvram's native CPU kernel: int4/int8 weight-only GEMV/GEMM that streams packed weights at the
 * memory bandwidth (single-stream decode is memory-bound; ONNX Runtime's MatMulNBits reached only
 * 18-20 GB/s of the machine's 32.7 here).
 *
 * Weight layout (made once at load by lvq_repack from the GPTQ layout):
 *   rows n = 0..N-1, each K/2 bytes (4-bit) or K bytes (8-bit), K a multiple of 128.
 *   4-bit: block b of 128 inputs is 64 bytes; byte j holds input 128b+j in its low nibble and
 *          input 128b+64+j in its high nibble, so one 64-byte load and two masks give two vectors
 *          of 64 consecutive inputs.
 *   8-bit: the unsigned codes in input order.
 *   scales fp16 [N][G], zeros uint8 [N][G] (true zero points), G = K / group.
 *   W[n][k] = scale[n][g] * (q[n][k] - zero[n][g]), g = k / group.
 *
 * Activations are quantized per 128 inputs to int8 (symmetric), like llama.cpp's Q8 activations
 * and ORT's accuracy_level 4. Then y[n] = sum_b sx_b * s * dot(q, xq) - sum_g s * zero * xsum_g,
 * where xsum_g is the sum of the dequantized activations of group g: the result is exactly
 * W @ x_hat for the dequantized activations x_hat.
 *
 * x86-64 with AVX512-VNNI runs the vpdpbusd path; every other CPU runs the portable C path,
 * which is correct but not fast (the Python side prefers ONNX Runtime there).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LVQ_X86 1
#endif

#define BLK 128
#ifndef LVQ_PF
#define LVQ_PF 1024 /* bytes ahead to prefetch the weight stream (measured: 1024 > 512, 2048, 4096) */
#endif
#ifndef LVQ_HINT
#define LVQ_HINT _MM_HINT_T0
#endif

static float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) { u = s; }
        else { float f = ldexpf((float)m, -24); memcpy(&u, &f, 4); u |= s; }
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static int has_vnni_cpu(void) {
#ifdef LVQ_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

static int force_generic = 0;

int lvq_has_vnni(void) { return has_vnni_cpu(); }

/* 1: use the portable path even where AVX512-VNNI exists (tests compare the two). */
void lvq_set_generic(int on) { force_generic = on; }

/* Ask for 2 MiB pages on a weight buffer before it is first written: streaming a 4 KiB-paged buffer
 * cost ~15% of the bandwidth here (TLB misses). */
void lvq_hugepages(void *p, int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t a = ((uintptr_t)p + (1u << 21) - 1) & ~(uintptr_t)((1u << 21) - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)n) & ~(uintptr_t)((1u << 21) - 1);
    if (e > a) madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* Quantize one row of activations: xq int8 [K], sx [K/128], xsum [K/group]. */
static void quant_x(const float *x, int64_t K, int group, int8_t *xq, float *sx, float *xsum) {
    int64_t nb = K / BLK, G = K / group;
    for (int64_t g = 0; g < G; g++) xsum[g] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * BLK;
        float amax = 0.f;
        for (int k = 0; k < BLK; k++) amax = fmaxf(amax, fabsf(xb[k]));
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        sx[b] = s;
        int sub = group < BLK ? group : BLK;
        for (int k0 = 0; k0 < BLK; k0 += sub) {
            int acc = 0;
            for (int k = k0; k < k0 + sub; k++) {
                int q = (int)lrintf(xb[k] * inv);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                xq[b * BLK + k] = (int8_t)q;
                acc += q;
            }
            xsum[(b * BLK + k0) / group] += (float)acc * s;
        }
    }
}


#ifdef LVQ_X86
/* quant_x on AVX512: the same rounding (nearest, ties to even) and the same sums. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static void quant_x_avx512(const float *x, int64_t K, int group, int8_t *xq, float *sx, float *xsum) {
    int64_t nb = K / BLK, G = K / group;
    for (int64_t g = 0; g < G; g++) xsum[g] = 0.f;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * BLK;
        __m512 v[8], mx = _mm512_setzero_ps();
        for (int j = 0; j < 8; j++) {
            v[j] = _mm512_loadu_ps(xb + 16 * j);
            mx = _mm512_max_ps(mx, _mm512_and_ps(v[j], absmask));
        }
        float amax = _mm512_reduce_max_ps(mx);
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        sx[b] = s;
        __m512 vinv = _mm512_set1_ps(inv);
        int32_t part[8];
        for (int j = 0; j < 8; j++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v[j], vinv), _MM_FROUND_TO_NEAREST_INT));
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            _mm_storeu_si128((__m128i *)(xq + b * BLK + 16 * j), _mm512_cvtepi32_epi8(q));
            part[j] = _mm512_reduce_add_epi32(q);
        }
        int sub = group < BLK ? group : BLK;
        for (int k0 = 0; k0 < BLK; k0 += sub) {
            int acc = 0;
            for (int j = k0 / 16; j < (k0 + sub) / 16; j++) acc += part[j];
            xsum[(b * BLK + k0) / group] += (float)acc * s;
        }
    }
}
#endif

/* The portable path: the same arithmetic in plain C. */
static void rows_generic(const int8_t *xq, const float *sx, const float *xsum, int64_t M, int64_t K,
                         const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int bits, int group,
                         int64_t n0, int64_t n1, int64_t N, const float *bias, float *y) {
    int64_t nb = K / BLK, G = K / group, rowbytes = bits == 4 ? K / 2 : K;
    float *sf = (float *)malloc(sizeof(float) * G);
    int32_t *q = (int32_t *)malloc(sizeof(int32_t) * BLK);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rowbytes;
        for (int64_t g = 0; g < G; g++) sf[g] = h2f(scales[n * G + g]);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            double acc = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                for (int j = 0; j < BLK; j++) {
                    if (bits == 4) q[j] = j < 64 ? (wr[b * 64 + j] & 15) : (wr[b * 64 + j - 64] >> 4);
                    else q[j] = wr[b * BLK + j];
                }
                int sub = group < BLK ? group : BLK;
                for (int k0 = 0; k0 < BLK; k0 += sub) {
                    int32_t d = 0;
                    for (int k = k0; k < k0 + sub; k++) d += q[k] * (int32_t)xm[b * BLK + k];
                    acc += (double)d * sx[m * nb + b] * sf[(b * BLK + k0) / group];
                }
            }
            const float *xs = xsum + m * G;
            for (int64_t g = 0; g < G; g++) acc -= (double)sf[g] * zeros[n * G + g] * xs[g];
            y[m * N + n] = (float)acc + (bias ? bias[n] : 0.f);
        }
    }
    free(q);
    free(sf);
}

#ifdef LVQ_X86
/* Two rows at once for the common decode case (one activation row, groups of >= 128): two weight
 * streams in flight per thread keep more cache misses outstanding than one (measured +10-15%). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
static void pair_vnni(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0, const float *c1,
                      int64_t nb, int bits, float *r0, float *r1) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t b = 0; b < nb; b++) {
        __m512i xl = _mm512_loadu_si512((const void *)(xm + b * BLK));
        __m512i xh = _mm512_loadu_si512((const void *)(xm + b * BLK + 64));
        __m512i l0, h0, l1, h1;
        if (bits == 4) {
            _mm_prefetch((const char *)(w0 + b * 64 + LVQ_PF), LVQ_HINT);
            _mm_prefetch((const char *)(w1 + b * 64 + LVQ_PF), LVQ_HINT);
            __m512i v0 = _mm512_loadu_si512((const void *)(w0 + b * 64));
            __m512i v1 = _mm512_loadu_si512((const void *)(w1 + b * 64));
            l0 = _mm512_and_si512(v0, m4);
            h0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
            l1 = _mm512_and_si512(v1, m4);
            h1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
        } else {
            _mm_prefetch((const char *)(w0 + b * BLK + LVQ_PF), LVQ_HINT);
            _mm_prefetch((const char *)(w0 + b * BLK + 64 + LVQ_PF), LVQ_HINT);
            _mm_prefetch((const char *)(w1 + b * BLK + LVQ_PF), LVQ_HINT);
            _mm_prefetch((const char *)(w1 + b * BLK + 64 + LVQ_PF), LVQ_HINT);
            l0 = _mm512_loadu_si512((const void *)(w0 + b * BLK));
            h0 = _mm512_loadu_si512((const void *)(w0 + b * BLK + 64));
            l1 = _mm512_loadu_si512((const void *)(w1 + b * BLK));
            h1 = _mm512_loadu_si512((const void *)(w1 + b * BLK + 64));
        }
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, l0, xl), h0, xh);
        __m512i d1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, l1, xl), h1, xh);
        if (b & 1) {
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(c0[b]), a1);
            b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(c1[b]), b1);
        } else {
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(c0[b]), a0);
            b0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(c1[b]), b0);
        }
    }
    *r0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    *r1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
}



/* One row for one activation row: its weight scales as floats (sf), the combined scale of each block
 * (activation x weight, cs; groups of >= 128 only) and the zero-point correction it returns. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
static float row_prep(const uint16_t *sr, const uint8_t *zr, const float *sxm, const float *xs, int64_t G,
                      int64_t nb, int group, float *sf, float *cs) {
    int64_t g = 0;
    for (; g + 16 <= G; g += 16)
        _mm512_store_ps(sf + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sr + g))));
    for (; g < G; g++) sf[g] = _cvtsh_ss(sr[g]);
    for (int64_t gi = 0, b = 0, bpg = group / BLK; gi < G; gi++)
        for (int64_t j = 0; j < bpg; j++, b++) cs[b] = sf[gi] * sxm[b];
    __m512 c = _mm512_setzero_ps();
    for (g = 0; g < G; g += 16) {
        __mmask16 k = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
        __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, zr + g)));
        c = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_load_ps(k, sf + g), z), _mm512_maskz_loadu_ps(k, xs + g), c);
    }
    return _mm512_reduce_add_ps(c);
}
#endif

#ifdef LVQ_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,f16c,fma")))
static void rows_vnni(const int8_t *xq, const float *sx, const float *xsum, int64_t M, int64_t K,
                      const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int bits, int group,
                      int64_t n0, int64_t n1, int64_t N, const float *bias, float *y) {
    int64_t nb = K / BLK, G = K / group, rowbytes = bits == 4 ? K / 2 : K;
    float *sf = (float *)aligned_alloc(64, sizeof(float) * ((G + 15) / 16 * 16));
    float *cs = (float *)aligned_alloc(64, sizeof(float) * ((nb + 15) / 16 * 16));
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i zero = _mm512_setzero_si512();
    int64_t n = n0;
    if (M == 1 && group >= BLK) {
        float *cs2 = (float *)aligned_alloc(64, sizeof(float) * ((nb + 15) / 16 * 16));
        float *sf2 = (float *)aligned_alloc(64, sizeof(float) * ((G + 15) / 16 * 16));
        /* The two rows come from the two halves of the range: two distant sequential streams, each
         * followed by the hardware prefetcher. */
        int64_t h = (n1 - n0) / 2;
        for (int64_t i = 0; i < h; i++) {
            int64_t na = n0 + i, nb2 = n0 + h + i;
            float c0 = row_prep(scales + na * G, zeros + na * G, sx, xsum, G, nb, group, sf, cs);
            float c1 = row_prep(scales + nb2 * G, zeros + nb2 * G, sx, xsum, G, nb, group, sf2, cs2);
            float r0, r1;
            pair_vnni(xq, w + na * rowbytes, w + nb2 * rowbytes, cs, cs2, nb, bits, &r0, &r1);
            y[na] = r0 - c0 + (bias ? bias[na] : 0.f);
            y[nb2] = r1 - c1 + (bias ? bias[nb2] : 0.f);
        }
        n = n0 + 2 * h;
        free(cs2);
        free(sf2);
    }
    for (; n < n1; n++) {
        const uint8_t *wr = w + n * rowbytes;
        if (n + 1 < n1) _mm_prefetch((const char *)(scales + (n + 1) * G), _MM_HINT_T0);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *sxm = sx + m * nb;
            /* weight scales (sf), combined block scales (cs, groups >= 128) and the zero-point term */
            float corr = row_prep(scales + n * G, zeros + n * G, sxm, xsum + m * G, G, nb, group, sf, cs);
            __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
#define LVQ_LOAD(b)                                                                 \
    __m512i lo, hi;                                                                 \
    if (bits == 4) {                                                                \
        _mm_prefetch((const char *)(wr + (b) * 64 + LVQ_PF), LVQ_HINT);          \
        __m512i v = _mm512_loadu_si512((const void *)(wr + (b) * 64));              \
        lo = _mm512_and_si512(v, m4);                                               \
        hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);                         \
    } else {                                                                        \
        _mm_prefetch((const char *)(wr + (b) * BLK + LVQ_PF), LVQ_HINT);         \
        _mm_prefetch((const char *)(wr + (b) * BLK + 64 + LVQ_PF), LVQ_HINT);    \
        lo = _mm512_loadu_si512((const void *)(wr + (b) * BLK));                    \
        hi = _mm512_loadu_si512((const void *)(wr + (b) * BLK + 64));               \
    }                                                                               \
    __m512i xl = _mm512_loadu_si512((const void *)(xm + (b) * BLK));                \
    __m512i xh = _mm512_loadu_si512((const void *)(xm + (b) * BLK + 64));
            if (group >= BLK) {
                /* Four blocks in flight, each with its own accumulator: the fma chain, not memory,
                 * was the limit with one. */
                __m512 acc3 = _mm512_setzero_ps(), acc4 = _mm512_setzero_ps();
                int64_t b = 0;
#define LVQ_BLOCK(bb, A)                                                                    \
    {                                                                                       \
        LVQ_LOAD(bb)                                                                        \
        __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xl), hi, xh);         \
        A = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(cs[bb]), A);              \
    }
                for (; b + 4 <= nb; b += 4) {
                    LVQ_BLOCK(b, acc)
                    LVQ_BLOCK(b + 1, acc2)
                    LVQ_BLOCK(b + 2, acc3)
                    LVQ_BLOCK(b + 3, acc4)
                }
                for (; b < nb; b++) LVQ_BLOCK(b, acc)
#undef LVQ_BLOCK
                acc = _mm512_add_ps(acc, acc3);
                acc2 = _mm512_add_ps(acc2, acc4);
            } else if (group == 64) {
                for (int64_t b = 0; b < nb; b++) {
                    LVQ_LOAD(b)
                    __m512i dl = _mm512_dpbusd_epi32(zero, lo, xl), dh = _mm512_dpbusd_epi32(zero, hi, xh);
                    float sb = sxm[b];
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_set1_ps(sb * sf[2 * b]), acc);
                    acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_set1_ps(sb * sf[2 * b + 1]), acc2);
                }
            } else { /* group 32: lanes 0-7 of each half are one group, lanes 8-15 the next */
                for (int64_t b = 0; b < nb; b++) {
                    LVQ_LOAD(b)
                    __m512i dl = _mm512_dpbusd_epi32(zero, lo, xl), dh = _mm512_dpbusd_epi32(zero, hi, xh);
                    __m512 sb = _mm512_set1_ps(sxm[b]);
                    const float *s4 = sf + 4 * b;
                    __m512 sl = _mm512_insertf32x8(_mm512_set1_ps(s4[0]), _mm256_set1_ps(s4[1]), 1);
                    __m512 sh = _mm512_insertf32x8(_mm512_set1_ps(s4[2]), _mm256_set1_ps(s4[3]), 1);
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_mul_ps(sl, sb), acc);
                    acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_mul_ps(sh, sb), acc2);
                }
            }
#undef LVQ_LOAD
            acc = _mm512_add_ps(acc, acc2);
            y[m * N + n] = _mm512_reduce_add_ps(acc) - corr + (bias ? bias[n] : 0.f);
        }
    }
    free(cs);
    free(sf);
}
#endif

static int check_shape(int64_t K, int bits, int group) {
    if (bits != 4 && bits != 8) return -1;
    if (K % BLK) return -2;
    if (!(group == 32 || group == 64 || (group >= BLK && group % BLK == 0))) return -3;
    if (K % group) return -4;
    return 0;
}

static int gemm_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *scales,
                    const uint8_t *zeros, int64_t N, int bits, int group, const float *bias, float *y, int nthreads) {
    int64_t nb = K / BLK, G = K / group;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 127) / 64 * 64));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * G));
    int vnni = !force_generic && has_vnni_cpu();
    for (int64_t m = 0; m < M; m++) {
#ifdef LVQ_X86
        if (vnni) {
            quant_x_avx512(x + m * K, K, group, xq + m * K, sx + m * nb, xsum + m * G);
            continue;
        }
#endif
        quant_x(x + m * K, K, group, xq + m * K, sx + m * nb, xsum + m * G);
    }
    if (nthreads < 1) nthreads = 1;
    /* Rows in chunks handed out dynamically: a thread that loses its core to another process
     * delays one chunk, not half of every matrix (a static split ran 6x slower on a busy core). */
    int64_t chunk = N / ((int64_t)nthreads * 16);
    chunk = chunk < 16 ? 16 : (chunk + 1) & ~(int64_t)1;
    int64_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t a = c * chunk, e = a + chunk < N ? a + chunk : N;
#ifdef LVQ_X86
        if (vnni)
            rows_vnni(xq, sx, xsum, M, K, w, scales, zeros, bits, group, a, e, N, bias, y);
        else
#endif
            rows_generic(xq, sx, xsum, M, K, w, scales, zeros, bits, group, a, e, N, bias, y);
    }
    free(xsum);
    free(sx);
    free(xq);
    return 0;
}

/* y [M][N] = x [M][K] @ W.T (+ bias). x and y are float32 (type 0) or bf16 (type 1), so a decode step
 * needs no dtype conversions around the call. Returns 0, or <0 for shapes it cannot run. */
int lvq_gemm(const void *x, int xtype, int64_t M, int64_t K, const uint8_t *w, const uint16_t *scales,
             const uint8_t *zeros, int64_t N, int bits, int group, const float *bias, void *y, int ytype,
             int nthreads) {
    int rc = check_shape(K, bits, group);
    if (rc) return rc;
    const float *xf = (const float *)x;
    float *tmpx = NULL, *yf = (float *)y, *tmpy = NULL;
    if (xtype == 1) {
        const uint16_t *xb = (const uint16_t *)x;
        tmpx = (float *)malloc(sizeof(float) * (size_t)(M * K));
        for (int64_t i = 0; i < M * K; i++) {
            uint32_t u = (uint32_t)xb[i] << 16;
            memcpy(tmpx + i, &u, 4);
        }
        xf = tmpx;
    }
    if (ytype == 1) yf = tmpy = (float *)malloc(sizeof(float) * (size_t)(M * N));
    rc = gemm_f32(xf, M, K, w, scales, zeros, N, bits, group, bias, yf, nthreads);
    if (ytype == 1) {
        uint16_t *yb = (uint16_t *)y;
        for (int64_t i = 0; i < M * N; i++) yb[i] = f2bf(tmpy[i]);
    }
    free(tmpx);
    free(tmpy);
    return rc;
}

#ifdef LVQ_X86
static int has_bf16_cpu(void) {
    __builtin_cpu_init();
    return has_vnni_cpu() && __builtin_cpu_supports("avx512bf16");
}

/* 16 codes -> 16 bf16 weights. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static inline void put16(__m128i q8, __m512 s, __m512 zs, uint16_t *o) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q8));
    _mm256_storeu_si256((__m256i *)o, (__m256i)_mm512_cvtneps_pbh(_mm512_fmsub_ps(q, s, zs)));
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))
static void dequant_rows_bf16(const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int64_t K, int bits,
                              int group, int64_t n, uint16_t *o) {
    int64_t G = K / group, rowbytes = bits == 4 ? K / 2 : K, nb = K / BLK;
    const uint8_t *wr = w + n * rowbytes;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        __m512i lo, hi;
        if (bits == 4) {
            __m512i v = _mm512_loadu_si512((const void *)(wr + b * 64));
            lo = _mm512_and_si512(v, m4);
            hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        } else {
            lo = _mm512_loadu_si512((const void *)(wr + b * BLK));
            hi = _mm512_loadu_si512((const void *)(wr + b * BLK + 64));
        }
        __m128i parts[8] = {_mm512_extracti32x4_epi32(lo, 0), _mm512_extracti32x4_epi32(lo, 1),
                            _mm512_extracti32x4_epi32(lo, 2), _mm512_extracti32x4_epi32(lo, 3),
                            _mm512_extracti32x4_epi32(hi, 0), _mm512_extracti32x4_epi32(hi, 1),
                            _mm512_extracti32x4_epi32(hi, 2), _mm512_extracti32x4_epi32(hi, 3)};
        for (int j = 0; j < 8; j++) {
            int64_t k = b * BLK + 16 * j, g = k / group;
            float s = _cvtsh_ss(scales[n * G + g]);
            put16(parts[j], _mm512_set1_ps(s), _mm512_set1_ps(s * (float)zeros[n * G + g]), o + k);
        }
    }
}
#endif

/* Rows n0..n1 of W as bf16 [n1-n0][K] (for prefill through a bf16 matrix multiply). */
int lvq_dequant_bf16(const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int64_t K, int bits,
                     int group, int64_t n0, int64_t n1, uint16_t *out, int nthreads) {
    int rc = check_shape(K, bits, group);
    if (rc) return rc;
    int64_t G = K / group, rowbytes = bits == 4 ? K / 2 : K;
    if (nthreads < 1) nthreads = 1;
#ifdef LVQ_X86
    if (!force_generic && has_bf16_cpu()) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = n0; n < n1; n++) dequant_rows_bf16(w, scales, zeros, K, bits, group, n, out + (n - n0) * K);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rowbytes;
        uint16_t *o = out + (n - n0) * K;
        for (int64_t g = 0; g < G; g++) {
            float s = h2f(scales[n * G + g]), z = (float)zeros[n * G + g];
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                int q;
                if (bits == 4) {
                    int64_t b = k / BLK, j = k % BLK;
                    q = j < 64 ? (wr[b * 64 + j] & 15) : (wr[b * 64 + j - 64] >> 4);
                } else {
                    q = wr[k];
                }
                o[k] = f2bf(((float)q - z) * s);
            }
        }
    }
    return 0;
}

/* GPTQ qweight int32 [K*bits/32][N] (packed along K, low bits first) -> our rows [N][rowbytes].
 * perm (may be NULL): input k of our layout is input perm[k] of the checkpoint (act-order). */
int lvq_repack(const int32_t *qweight, int64_t K, int64_t N, int bits, const int32_t *perm, uint8_t *out,
               int nthreads) {
    if ((bits != 4 && bits != 8) || K % BLK) return -1;
    int64_t rowbytes = bits == 4 ? K / 2 : K, per = 32 / bits, mask = (1 << bits) - 1;
    const int64_t T = 64;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += T) {
        int64_t n1 = n0 + T < N ? n0 + T : N;
        for (int64_t k = 0; k < K; k++) {
            int64_t src = perm ? perm[k] : k;
            const uint32_t *row = (const uint32_t *)qweight + (src / per) * N;
            int sh = (int)((src % per) * bits);
            if (bits == 8) {
                for (int64_t n = n0; n < n1; n++) out[n * rowbytes + k] = (uint8_t)((row[n] >> sh) & mask);
            } else {
                int64_t b = k / BLK, j = k % BLK;
                int64_t pos = b * 64 + (j < 64 ? j : j - 64);
                if (j < 64) {
                    for (int64_t n = n0; n < n1; n++) out[n * rowbytes + pos] = (uint8_t)((row[n] >> sh) & mask);
                } else {
                    for (int64_t n = n0; n < n1; n++) out[n * rowbytes + pos] |= (uint8_t)(((row[n] >> sh) & mask) << 4);
                }
            }
        }
    }
    return 0;
}

/* An importable module, so that Python finds this library the usual way; the functions above are
 * called through ctypes, which releases the GIL for their duration. */
static struct PyModuleDef lvq_module = {PyModuleDef_HEAD_INIT, "_lvq", "lowvram native CPU kernels", -1, NULL};

PyMODINIT_FUNC PyInit__lvq(void) { return PyModule_Create(&lvq_module); }
