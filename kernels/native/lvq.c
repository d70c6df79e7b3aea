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
 * Three paths, the best the CPU has: AVX512-VNNI (vpdpbusd: 512-bit in the prompt loops, which from 8
 * rows run on weight tiles copied into 16-row panels, see pack_panels; 256-bit in decode, which 512-bit
 * vectors slowed on Ice Lake), AVX2 (vpmaddubsw; 8-bit codes as |q-128| against
 * x*sign(q-128), see part_q8: AMD Zen 2-4 and most laptop CPUs have no VNNI), and portable C, which is
 * correct but not fast (the Python side prefers ONNX Runtime there). All three compute the same integer
 * dot products; only the float summation order differs.
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
#include <cpuid.h>
#include <immintrin.h>
#define LVQ_X86 1
#endif

#define BLK 128
#define LVQ_MR 4 /* activation rows per weight row in the prompt loops (the quad_* functions name four) */
#ifndef LVQ_PF_ROWS
#define LVQ_PF_ROWS 4 /* rows ahead to prefetch a decode row's scales and zeros */
#endif
/* Bytes ahead to prefetch the weight stream: 1024 measured best on Intel (> 512, 2048, 4096 on the AMX machine
 * and Ice Lake); on a Zen 5 4096 streamed a decode step's weights 1.22-1.28x faster than 1024 (8192: 1.23x),
 * so AMD family 26 and later take 4096 (pick_prefetch). -DLVQ_PF=n fixes it at build time, for experiments. */
#ifdef LVQ_PF
static int64_t pf_ahead = LVQ_PF;
#else
static int64_t pf_ahead = 1024;
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

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Where the kernel writes its results: float32 (t = 0) or bf16 (t = 1), so a bf16 model's output needs
 * no float copy of the whole [M][N] result. */
typedef struct {
    void *p;
    int t;
} out_t;

static inline void put(out_t y, int64_t i, float v) {
    if (y.t == 1) ((uint16_t *)y.p)[i] = f2bf(v);
    else ((float *)y.p)[i] = v;
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

static int has_avx2_cpu(void) {
#ifdef LVQ_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

enum { ISA_GENERIC = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
static int isa_cap = ISA_VNNI;

/* The path that runs: the best the CPU has, at most the cap set by lvq_set_isa. */
int lvq_isa(void) {
    int isa = has_vnni_cpu() ? ISA_VNNI : has_avx2_cpu() ? ISA_AVX2 : ISA_GENERIC;
    return isa < isa_cap ? isa : isa_cap;
}

#if defined(LVQ_X86) && !defined(LVQ_PF)
__attribute__((constructor)) static void pick_prefetch(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u) return; /* "Auth"enticAMD */
    __get_cpuid(1, &a, &b, &c, &d);
    unsigned family = ((a >> 8) & 0xF) + (((a >> 8) & 0xF) == 0xF ? (a >> 20) & 0xFF : 0);
    if (family >= 26) pf_ahead = 4096;
}
#endif

/* Cap the path (0 portable, 1 AVX2, 2 AVX512-VNNI), so tests compare every path the CPU can run. */
void lvq_set_isa(int cap) { isa_cap = cap; }

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
/* xsum[g] += s * (the codes of group g within block b), from part[j] = the sum of the block's codes
 * j*width .. (j+1)*width-1 (width 16 or 32, dividing every group size the kernel takes). */
static void add_xsums(const int32_t *part, int width, int group, int64_t b, float s, float *xsum) {
    int sub = group < BLK ? group : BLK;
    for (int k0 = 0; k0 < BLK; k0 += sub) {
        int acc = 0;
        for (int j = k0 / width; j < (k0 + sub) / width; j++) acc += part[j];
        xsum[(b * BLK + k0) / group] += (float)acc * s;
    }
}

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
        add_xsums(part, 16, group, b, s, xsum);
    }
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* quant_x on AVX2: the same rounding and sums. */
AVX2 static void quant_x_avx2(const float *x, int64_t K, int group, int8_t *xq, float *sx, float *xsum) {
    int64_t nb = K / BLK, G = K / group;
    for (int64_t g = 0; g < G; g++) xsum[g] = 0.f;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * BLK;
        __m256 v[16], mx = _mm256_setzero_ps();
        for (int j = 0; j < 16; j++) {
            v[j] = _mm256_loadu_ps(xb + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        sx[b] = s;
        __m256 vinv = _mm256_set1_ps(inv);
        int32_t part[4];
        for (int j = 0; j < 4; j++) { /* 32 inputs at a time */
            __m256i q[4];
            for (int i = 0; i < 4; i++) {
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * j + i], vinv)); /* nearest, ties to even */
                q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
            }
            __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
            part[j] = _mm_cvtsi128_si32(t4);
            /* packs work within 128-bit lanes: pack, then put the 4-byte pieces back in order */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            p = _mm256_permutevar8x32_epi32(p, order);
            _mm256_storeu_si256((__m256i *)(xq + b * BLK + 32 * j), p);
        }
        add_xsums(part, 32, group, b, s, xsum);
    }
}

AVX2 static inline __m256 ld8bf(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* f2bf on 8 floats, bit for bit (round to nearest even; a NaN stays a quiet NaN). */
AVX2 static inline void st8bf(uint16_t *o, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
    _mm_storeu_si128((__m128i *)o, _mm_packus_epi32(lo, hi));
}

/* y[i] = v[i] + bias[i] (bias may be NULL) for n consecutive outputs from i0, 8 at a time. */
AVX2 static void put_row(out_t y, int64_t i0, const float *v, const float *bias, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        if (bias) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + i));
        if (y.t == 1) st8bf((uint16_t *)y.p + i0 + i, x);
        else _mm256_storeu_ps((float *)y.p + i0 + i, x);
    }
    for (; i < n; i++) put(y, i0 + i, v[i] + (bias ? bias[i] : 0.f));
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* row_prep for the AVX2 path. */
/* zshift: 128 for 8-bit weights, whose dot products are taken on q - 128 (part_q8). */
AVX2 static float row_prep_avx2(const uint16_t *sr, const uint8_t *zr, const float *sxm, const float *xs, int64_t G,
                                int64_t nb, int group, float *sf, float *cs, float zshift) {
    int64_t g = 0;
    __m256 c8 = _mm256_setzero_ps();
    for (; g + 8 <= G; g += 8) {
        __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g)));
        _mm256_storeu_ps(sf + g, s8);
        __m256 z8 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g)))),
                                  _mm256_set1_ps(zshift));
        c8 = _mm256_fmadd_ps(_mm256_mul_ps(s8, z8), _mm256_loadu_ps(xs + g), c8);
        if (group == BLK) _mm256_storeu_ps(cs + g, _mm256_mul_ps(s8, _mm256_loadu_ps(sxm + g)));
    }
    float c = hsum256(c8);
    for (int64_t g1 = g; g1 < G; g1++) {
        sf[g1] = _cvtsh_ss(sr[g1]);
        c += sf[g1] * ((float)zr[g1] - zshift) * xs[g1];
        if (group == BLK) cs[g1] = sf[g1] * sxm[g1];
    }
    if (group != BLK)
        for (int64_t gi = 0, b = 0, bpg = group / BLK; gi < G; gi++)
            for (int64_t j = 0; j < bpg; j++, b++) cs[b] = sf[gi] * sxm[b];
    return c;
}

/* Decode's pair of rows with one 128-input block per group, on AVX2: row_prep_avx2 for both rows in one pass
 * (no per-group scales kept: the block coefficients carry them). */
AVX2 static void pair_prep_avx2(const uint16_t *s0, const uint8_t *z0, const uint16_t *s1, const uint8_t *z1,
                                const float *sxm, const float *xs, int64_t G, float zshift, float *cs0, float *cs1,
                                float *c0, float *c1) {
    const __m256 zsh = _mm256_set1_ps(zshift);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 x = _mm256_loadu_ps(xs + g), sx = _mm256_loadu_ps(sxm + g);
        __m256 f0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s0 + g)));
        __m256 f1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s1 + g)));
        __m256 q0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z0 + g)))), zsh);
        __m256 q1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z1 + g)))), zsh);
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(f0, q0), x, a0);
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(f1, q1), x, a1);
        _mm256_storeu_ps(cs0 + g, _mm256_mul_ps(f0, sx));
        _mm256_storeu_ps(cs1 + g, _mm256_mul_ps(f1, sx));
    }
    float r0 = hsum256(a0), r1 = hsum256(a1);
    for (; g < G; g++) {
        float f0 = _cvtsh_ss(s0[g]), f1 = _cvtsh_ss(s1[g]);
        r0 += f0 * ((float)z0[g] - zshift) * xs[g];
        r1 += f1 * ((float)z1[g] - zshift) * xs[g];
        cs0[g] = f0 * sxm[g];
        cs1[g] = f1 * sxm[g];
    }
    *c0 = r0;
    *c1 = r1;
}

/* Prompts, where every weight row meets many activation rows: the weight row's scales sf and scale x shifted
 * zero sz, per group, once per call; quad_q4/quad_q8 then multiply sf by each activation row's block scale
 * in their loop and take the zero-point term in quad_finish. Decode keeps one pass per row (row_prep_avx2, pair_prep_*): built
 * from a split like this (sz through memory) it measured ~5 ms/token slower. */
AVX2 static void row_scales_avx2(const uint16_t *sr, const uint8_t *zr, int64_t G, float zshift, float *sf, float *sz) {
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g)));
        __m256 z8 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g)))),
                                  _mm256_set1_ps(zshift));
        _mm256_storeu_ps(sf + g, s8);
        _mm256_storeu_ps(sz + g, _mm256_mul_ps(s8, z8));
    }
    for (; g < G; g++) {
        sf[g] = _cvtsh_ss(sr[g]);
        sz[g] = sf[g] * ((float)zr[g] - zshift);
    }
}

/* out[i] = hsum(a_i) minus the zero-point term sum_g sz[g] * xs_i[g] of activation row i (rows G apart). */
AVX2 static inline void quad_finish(__m256 a0, __m256 a1, __m256 a2, __m256 a3, const float *sz, const float *xs,
                                    int64_t G, float *out) {
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 z = _mm256_loadu_ps(sz + g);
        a0 = _mm256_fnmadd_ps(z, _mm256_loadu_ps(xs + g), a0);
        a1 = _mm256_fnmadd_ps(z, _mm256_loadu_ps(xs + G + g), a1);
        a2 = _mm256_fnmadd_ps(z, _mm256_loadu_ps(xs + 2 * G + g), a2);
        a3 = _mm256_fnmadd_ps(z, _mm256_loadu_ps(xs + 3 * G + g), a3);
    }
    out[0] = hsum256(a0), out[1] = hsum256(a1), out[2] = hsum256(a2), out[3] = hsum256(a3);
    for (; g < G; g++)
        for (int i = 0; i < 4; i++) out[i] -= sz[g] * xs[i * G + g];
}

/* A block's 128 activations as four vectors of 32. */
typedef struct {
    __m256i v[4];
} xblock;

AVX2 static inline xblock load_x(const int8_t *xb) {
    xblock x;
    for (int i = 0; i < 4; i++) x.v[i] = _mm256_loadu_si256((const __m256i *)(xb + 32 * i));
    return x;
}

/* The four 32-input parts of one 128-input block as int16 pair sums (4-bit: vpmaddubsw of the 0..15
 * codes with the int8 activations, at most 3810 per lane, so sums of parts cannot overflow). */
AVX2 static inline void parts_q4(const uint8_t *wb, xblock x, __m256i p[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i va = _mm256_loadu_si256((const __m256i *)wb), vb = _mm256_loadu_si256((const __m256i *)(wb + 32));
    /* byte j of the block: input j (low nibble) and input 64 + j (high) */
    p[0] = _mm256_maddubs_epi16(_mm256_and_si256(va, m4), x.v[0]);
    p[1] = _mm256_maddubs_epi16(_mm256_and_si256(vb, m4), x.v[1]);
    p[2] = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(va, 4), m4), x.v[2]);
    p[3] = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(vb, 4), m4), x.v[3]);
}

/* 8-bit codes reach 255, so vpmaddubsw on them could saturate. Instead: q - 128 (signed) against the
 * activations by vpmaddubsw(|q - 128|, x * sign(q - 128)): |q - 128| <= 128 as unsigned, |x| <= 127,
 * pair sums <= 32512. The 128 * sum(x) left out goes into the zero-point term (zero - 128, row_prep). */
AVX2 static inline __m256i codes_q8(const uint8_t *wp) { /* 32 codes as q - 128 */
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wp), _mm256_set1_epi8((char)0x80));
}
AVX2 static inline __m256i dot_q8s(__m256i q, __m256i xv) { /* q from codes_q8 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q)), _mm256_set1_epi16(1));
}
AVX2 static inline __m256i part_q8(const uint8_t *wp, __m256i xv) { return dot_q8s(codes_q8(wp), xv); }

/* The dot product of one whole block as 8 int32 lanes, per bit width (wb: the block's codes). */
AVX2 static inline __m256i dot_q4(const uint8_t *wb, xblock x) {
    __m256i p[4];
    parts_q4(wb, x, p);
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                             _mm256_set1_epi16(1));
}

AVX2 static inline __m256i dot_q8(const uint8_t *wb, xblock x) {
    return _mm256_add_epi32(_mm256_add_epi32(part_q8(wb, x.v[0]), part_q8(wb + 32, x.v[1])),
                            _mm256_add_epi32(part_q8(wb + 64, x.v[2]), part_q8(wb + 96, x.v[3])));
}

AVX2 static inline __m256i block_dot_avx2(const uint8_t *wr, const int8_t *xm, int64_t b, int bits) {
    xblock x = load_x(xm + b * BLK);
    return bits == 4 ? dot_q4(wr + b * 64, x) : dot_q8(wr + b * BLK, x);
}

/* prefetcht0 in asm: GCC 12 drops _mm_prefetch from these avx2-target functions (the vnni ones keep theirs). */
static inline void pf(const uint8_t *p) { __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p)); }

/* Every line of n bytes from p. */
static inline void pf_range(const void *p, int64_t n) {
    const uint8_t *b = (const uint8_t *)p;
    for (int64_t i = 0; i < n; i += 64) pf(b + i);
    pf(b + n - 1);
}

AVX2 static inline void prefetch_block(const uint8_t *wr, int64_t b, int bits) {
    if (bits == 4) {
        pf(wr + b * 64 + pf_ahead);
    } else {
        pf(wr + b * BLK + pf_ahead);
        pf(wr + b * BLK + 64 + pf_ahead);
    }
}

AVX2 static inline __m256i small_q4(__m256i p0, __m256i p1, __m256i p2, __m256i p3, const int g32) {
    /* int16 pair sums of at most 3810: four of them still fit */
    __m256i h = g32 ? _mm256_hadd_epi16(_mm256_hadd_epi16(p0, p1), _mm256_hadd_epi16(p2, p3))
                    : _mm256_hadd_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
    return _mm256_madd_epi16(h, _mm256_set1_epi16(1));
}

/* The same for 8-bit parts, already int32 (part_q8). */
AVX2 static inline __m256i small_q8(__m256i d0, __m256i d1, __m256i d2, __m256i d3, const int g32) {
    return g32 ? _mm256_hadd_epi32(_mm256_hadd_epi32(d0, d1), _mm256_hadd_epi32(d2, d3))
               : _mm256_hadd_epi32(_mm256_add_epi32(d0, d1), _mm256_add_epi32(d2, d3));
}

/* A block's lane scales for small_q4/small_q8's lanes: groups 0..3 (32) or 0,0,1,1 (64), times sb. */
AVX2 static inline __m256 small_scales(const float *sf, int64_t b, float sb, const int g32) {
    __m128 s = g32 ? _mm_loadu_ps(sf + 4 * b) : _mm_castpd_ps(_mm_load_sd((const double *)(sf + 2 * b)));
    if (!g32) s = _mm_unpacklo_ps(s, s);
    s = _mm_mul_ps(s, _mm_set1_ps(sb));
    return _mm256_set_m128(s, s);
}

/* One weight row against one activation row, groups of 32 or 64: each block's parts in one vector. */
AVX2 static inline float row_dot_small(const uint8_t *wr, const int8_t *xm, const float *sxm, const float *sf,
                                       int64_t nb, int bits, const int g32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int64_t b = 0; b < nb; b++) {
        prefetch_block(wr, b, bits);
        xblock x = load_x(xm + b * BLK);
        __m256i t;
        if (bits == 4) {
            __m256i p[4];
            parts_q4(wr + b * 64, x, p);
            t = small_q4(p[0], p[1], p[2], p[3], g32);
        } else {
            const uint8_t *wb = wr + b * BLK;
            t = small_q8(part_q8(wb, x.v[0]), part_q8(wb + 32, x.v[1]), part_q8(wb + 64, x.v[2]), part_q8(wb + 96, x.v[3]), g32);
        }
        __m256 sc = small_scales(sf, b, sxm[b], g32);
        if (b & 1)
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, a1);
        else
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, a0);
    }
    return hsum256(_mm256_add_ps(a0, a1));
}

/* Two rows at once for groups of 32 or 64 (decode), as pair_q4_avx2: two weight streams per thread. */
AVX2 static inline void pair_small(const uint8_t *w0, const uint8_t *w1, const int8_t *xm, const float *sxm,
                                   const float *sf0, const float *sf1, int64_t nb, int bits, float *r0, float *r1,
                                   const int g32) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0;
    const int64_t RB = bits == 4 ? 64 : BLK;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j = 0; j < RB; j += 64) {
            pf(w0 + b * RB + j + pf_ahead);
            pf(w1 + b * RB + j + pf_ahead);
        }
        xblock x = load_x(xm + b * BLK);
        __m256i t0, t1;
        if (bits == 4) {
            __m256i p[4];
            parts_q4(w0 + b * 64, x, p);
            t0 = small_q4(p[0], p[1], p[2], p[3], g32);
            parts_q4(w1 + b * 64, x, p);
            t1 = small_q4(p[0], p[1], p[2], p[3], g32);
        } else {
            const uint8_t *u = w0 + b * BLK, *v = w1 + b * BLK;
            t0 = small_q8(part_q8(u, x.v[0]), part_q8(u + 32, x.v[1]), part_q8(u + 64, x.v[2]), part_q8(u + 96, x.v[3]), g32);
            t1 = small_q8(part_q8(v, x.v[0]), part_q8(v + 32, x.v[1]), part_q8(v + 64, x.v[2]), part_q8(v + 96, x.v[3]), g32);
        }
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), small_scales(sf0, b, sxm[b], g32), a0);
        b0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), small_scales(sf1, b, sxm[b], g32), b0);
    }
    *r0 = hsum256(a0);
    *r1 = hsum256(b0);
}

/* Each width and group size its own compiled loop. */
AVX2 static void pair_small_avx2(const uint8_t *w0, const uint8_t *w1, const int8_t *xm, const float *sxm,
                                 const float *sf0, const float *sf1, int64_t nb, int bits, int group, float *r0,
                                 float *r1) {
    if (bits == 4) {
        if (group == 32) pair_small(w0, w1, xm, sxm, sf0, sf1, nb, 4, r0, r1, 1);
        else pair_small(w0, w1, xm, sxm, sf0, sf1, nb, 4, r0, r1, 0);
    } else {
        if (group == 32) pair_small(w0, w1, xm, sxm, sf0, sf1, nb, 8, r0, r1, 1);
        else pair_small(w0, w1, xm, sxm, sf0, sf1, nb, 8, r0, r1, 0);
    }
}

/* One weight row against one activation row: sf the row's scales, cs each block's scale times sxm's (groups >= 128). */
AVX2 static float row_dot_avx2(const uint8_t *wr, const int8_t *xm, const float *sxm,
                               const float *sf, const float *cs, int64_t nb, int bits, int group) {
    if (group < BLK)
        return group == 32 ? row_dot_small(wr, xm, sxm, sf, nb, bits, 1) : row_dot_small(wr, xm, sxm, sf, nb, bits, 0);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        prefetch_block(wr, b, bits);
        prefetch_block(wr, b + 1, bits);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(wr, xm, b, bits)), _mm256_set1_ps(cs[b]), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(wr, xm, b + 1, bits)), _mm256_set1_ps(cs[b + 1]), a1);
    }
    for (; b < nb; b++)
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(wr, xm, b, bits)), _mm256_set1_ps(cs[b]), a0);
    return hsum256(_mm256_add_ps(a0, a1));
}

/* Two rows at once (decode, groups >= 128): two distant weight streams per thread keep more cache misses
 * outstanding than one (measured +10-15%). A loop
 * per bit width, each block's activations loaded once for both rows: with both widths in one loop GCC
 * spilled accumulators and activations to the stack (measured 1.1-1.2x slower). Even and odd blocks
 * keep their own accumulators, the summation order of row_dot_avx2. LVQ_PAIR_STEP: block i of both rows
 * against the same activations (the pair functions' w0, w1, c0, c1, xm and RB, the bytes per block). */
#define LVQ_PAIR_STEP(DOT, A, B, i)                                                                    \
    {                                                                                                  \
        xblock x = load_x(xm + (i) * BLK);                                                             \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w0 + (i) * RB, x)), _mm256_set1_ps(c0[i]), A);      \
        B = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w1 + (i) * RB, x)), _mm256_set1_ps(c1[i]), B);      \
    }

AVX2 static void pair_q4_avx2(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0,
                              const float *c1, int64_t nb, float *r0, float *r1) {
    enum { RB = 64 };
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        pf(w0 + i * RB + pf_ahead);
        pf(w1 + i * RB + pf_ahead);
        pf(w0 + i * RB + 64 + pf_ahead);
        pf(w1 + i * RB + 64 + pf_ahead);
        LVQ_PAIR_STEP(dot_q4, a0, b0, i)
        LVQ_PAIR_STEP(dot_q4, a1, b1, i + 1)
    }
    for (; i < nb; i++) LVQ_PAIR_STEP(dot_q4, a0, b0, i)
    *r0 = hsum256(_mm256_add_ps(a0, a1));
    *r1 = hsum256(_mm256_add_ps(b0, b1));
}

AVX2 static void pair_q8_avx2(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0,
                              const float *c1, int64_t nb, float *r0, float *r1) {
    enum { RB = BLK };
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        for (int j = 0; j < 4; j++) {
            pf(w0 + i * RB + 64 * j + pf_ahead);
            pf(w1 + i * RB + 64 * j + pf_ahead);
        }
        LVQ_PAIR_STEP(dot_q8, a0, b0, i)
        LVQ_PAIR_STEP(dot_q8, a1, b1, i + 1)
    }
    for (; i < nb; i++) LVQ_PAIR_STEP(dot_q8, a0, b0, i)
    *r0 = hsum256(_mm256_add_ps(a0, a1));
    *r1 = hsum256(_mm256_add_ps(b0, b1));
}
#undef LVQ_PAIR_STEP

/* Prompts, groups >= 128: one weight row against four activation rows, so each weight block is unpacked
 * once and feeds four dot products. sfb [nb]: the weight row's scale per block; sx0 [4][nb] the activation
 * rows' (their product formed in the loop measured 7% faster than a table of products built per weight
 * and activation row); sz, xs0 [4][G]: the zero-point term's halves, see quad_finish. On Zen 3 vpmaddubsw,
 * vpmaddwd, vcvtdq2ps and the float multiplies share two pipes (measured), 32 of them a block: ~16 cycles,
 * ~97 GMAC/s a core, which this loop reaches in cache. A product table filled 8 at a time, or int32 ->
 * float by adding 2^23 + 2^22 instead of vcvtdq2ps, measured no faster in the GEMM.
 * A function per bit width with named accumulators: an array of them and both widths in one loop were
 * spilled to the stack by GCC (measured 1.5x slower). */
AVX2 static void quad_q4(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sfb, const float *sx0,
                         int64_t nb, const float *sz, const float *xs0, int64_t G, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m256i one = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(wr + b * 64));
        __m256i vb = _mm256_loadu_si256((const __m256i *)(wr + b * 64 + 32));
        __m256i la = _mm256_and_si256(va, m4), lb = _mm256_and_si256(vb, m4);
        __m256i ha = _mm256_and_si256(_mm256_srli_epi16(va, 4), m4), hb = _mm256_and_si256(_mm256_srli_epi16(vb, 4), m4);
        const __m256 sw = _mm256_broadcast_ss(sfb + b);
#define LVQ_ROW(r, A)                                                                                       \
    {                                                                                                       \
        const __m256i *xb = (const __m256i *)(x0 + (r) * K + b * BLK);                                       \
        __m256i p = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(la, _mm256_loadu_si256(xb)),      \
                                                      _mm256_maddubs_epi16(lb, _mm256_loadu_si256(xb + 1))), \
                                     _mm256_add_epi16(_mm256_maddubs_epi16(ha, _mm256_loadu_si256(xb + 2)),  \
                                                      _mm256_maddubs_epi16(hb, _mm256_loadu_si256(xb + 3)))); \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, one)), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + (r) * nb + b)), A); \
    }
        LVQ_ROW(0, a0) LVQ_ROW(1, a1) LVQ_ROW(2, a2) LVQ_ROW(3, a3)
#undef LVQ_ROW
    }
    quad_finish(a0, a1, a2, a3, sz, xs0, G, out);
}

/* 8-bit: a 32-input part of the weight row at a time against the four rows (part_q8's arithmetic). */
AVX2 static void quad_q8(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sfb, const float *sx0,
                         int64_t nb, const float *sz, const float *xs0, int64_t G, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = 0; b < nb; b++) {
        __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0;
        for (int i = 0; i < 4; i++) {
            __m256i q = codes_q8(wr + b * BLK + 32 * i);
#define LVQ_ROW(r, D) \
    D = _mm256_add_epi32(D, dot_q8s(q, _mm256_loadu_si256((const __m256i *)(x0 + (r) * K + b * BLK + 32 * i))));
            LVQ_ROW(0, d0) LVQ_ROW(1, d1) LVQ_ROW(2, d2) LVQ_ROW(3, d3)
#undef LVQ_ROW
        }
        const __m256 sw = _mm256_broadcast_ss(sfb + b);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + b)), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + nb + b)), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d2), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + 2 * nb + b)), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d3), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + 3 * nb + b)), a3);
    }
    quad_finish(a0, a1, a2, a3, sz, xs0, G, out);
}

/* Prompts with groups of 32 or 64: as quad_q4/quad_q8, but a block's four 32-input parts carry up to four
 * weight scales, so each row's parts are reduced by horizontal adds into one vector whose lanes keep the
 * groups apart (per 128-bit half: groups 0,1,2,3 for 32; 0,0,1,1 for 64), and one multiply by the matching
 * scales sw4 [nb][4] (each block's four lane scales) times the row's block scale takes the whole block.
 * Without this, these groups ran row by row at 40% of the speed of groups of 128. */
AVX2 static inline void quad_q4_small(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sw4,
                                      const float *sx0, int64_t nb, const float *sz, const float *xs0, int64_t G,
                                      float *out, const int g32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(wr + b * 64));
        __m256i vb = _mm256_loadu_si256((const __m256i *)(wr + b * 64 + 32));
        __m256i la = _mm256_and_si256(va, m4), lb = _mm256_and_si256(vb, m4);
        __m256i ha = _mm256_and_si256(_mm256_srli_epi16(va, 4), m4), hb = _mm256_and_si256(_mm256_srli_epi16(vb, 4), m4);
        const __m256 sw = _mm256_broadcast_ps((const __m128 *)(sw4 + 4 * b));
#define LVQ_ROW(r, A)                                                                                         \
    {                                                                                                         \
        const __m256i *xb = (const __m256i *)(x0 + (r) * K + b * BLK);                                         \
        __m256i t = small_q4(_mm256_maddubs_epi16(la, _mm256_loadu_si256(xb)),                                 \
                             _mm256_maddubs_epi16(lb, _mm256_loadu_si256(xb + 1)),                             \
                             _mm256_maddubs_epi16(ha, _mm256_loadu_si256(xb + 2)),                             \
                             _mm256_maddubs_epi16(hb, _mm256_loadu_si256(xb + 3)), g32);                       \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + (r) * nb + b)), A); \
    }
        LVQ_ROW(0, a0) LVQ_ROW(1, a1) LVQ_ROW(2, a2) LVQ_ROW(3, a3)
#undef LVQ_ROW
    }
    quad_finish(a0, a1, a2, a3, sz, xs0, G, out);
}

/* 8-bit: parts 0 and 1 of the four rows first (their pair kept per row), then parts 2 and 3. */
AVX2 static inline void quad_q8_small(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sw4,
                                      const float *sx0, int64_t nb, const float *sz, const float *xs0, int64_t G,
                                      float *out, const int g32) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = wr + b * BLK;
        const __m256 sw = _mm256_broadcast_ps((const __m128 *)(sw4 + 4 * b));
        __m256i q0 = codes_q8(wb), q1 = codes_q8(wb + 32);
        __m256i h01[4];
        for (int r = 0; r < 4; r++) {
            const __m256i *xb = (const __m256i *)(x0 + r * K + b * BLK);
            __m256i d0 = dot_q8s(q0, _mm256_loadu_si256(xb)), d1 = dot_q8s(q1, _mm256_loadu_si256(xb + 1));
            h01[r] = g32 ? _mm256_hadd_epi32(d0, d1) : _mm256_add_epi32(d0, d1);
        }
        __m256i q2 = codes_q8(wb + 64), q3 = codes_q8(wb + 96);
        for (int r = 0; r < 4; r++) {
            const __m256i *xb = (const __m256i *)(x0 + r * K + b * BLK);
            __m256i d2 = dot_q8s(q2, _mm256_loadu_si256(xb + 2)), d3 = dot_q8s(q3, _mm256_loadu_si256(xb + 3));
            __m256i t = _mm256_hadd_epi32(h01[r], g32 ? _mm256_hadd_epi32(d2, d3) : _mm256_add_epi32(d2, d3));
            a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(sw, _mm256_broadcast_ss(sx0 + r * nb + b)), a[r]);
        }
    }
    quad_finish(a[0], a[1], a[2], a[3], sz, xs0, G, out);
}

/* One compiled copy of a prompt loop per width and group size (the constant folds into its inner loop). */
#define LVQ_QUAD_AS(ATTR, name, impl, c)                                                                     \
    ATTR static void name(const uint8_t *w, const int8_t *x, int64_t K, const float *s, const float *sx,     \
                          int64_t nb, const float *sz, const float *xs, int64_t G, float *out) {             \
        impl(w, x, K, s, sx, nb, sz, xs, G, out, c);                                                         \
    }
LVQ_QUAD_AS(AVX2, quad_q4_g32, quad_q4_small, 1)
LVQ_QUAD_AS(AVX2, quad_q4_g64, quad_q4_small, 0)
LVQ_QUAD_AS(AVX2, quad_q8_g32, quad_q8_small, 1)
LVQ_QUAD_AS(AVX2, quad_q8_g64, quad_q8_small, 0)

/* The prompt loops on AVX512-VNNI: vpdpbusd multiplies the unsigned codes (4- and 8-bit alike, no q - 128
 * shift) by the int8 activations and sums four products into each int32 lane, one instruction for what
 * takes vpmaddubsw + vpmaddwd on AVX2. A block's 128 inputs are two vectors of 64: lanes 0-7 of each are
 * its inputs 0-31 (64-95), lanes 8-15 inputs 32-63 (96-127). Scales and zero-point term as in quad_q4. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")))

VNNI static inline __m256 fold512(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

/* Block b of a weight row as two vectors of 64 unsigned codes: inputs 0-63 and 64-127. */
VNNI static inline void load_w512(const uint8_t *wr, int64_t b, const int bits, __m512i *lo, __m512i *hi) {
    if (bits == 4) {
        const __m512i v = _mm512_loadu_si512((const void *)(wr + b * 64)), m4 = _mm512_set1_epi8(0x0F);
        *lo = _mm512_and_si512(v, m4), *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    } else {
        *lo = _mm512_loadu_si512((const void *)(wr + b * BLK));
        *hi = _mm512_loadu_si512((const void *)(wr + b * BLK + 64));
    }
}

/* Four blocks' int32 dot products (16 lanes each) summed down to 4 lanes a block, block i in 128-bit chunk i,
 * by shuffles, which run beside the multiplies (Ice Lake: vpdpbusd and 512-bit FMAs share one pipe, measured;
 * the shuffle pipe is otherwise idle), so one convert and one FMA take four blocks instead of one. */
VNNI static inline __m512i merge4(__m512i d0, __m512i d1, __m512i d2, __m512i d3) {
    __m512i m01 = _mm512_add_epi32(_mm512_shuffle_i32x4(d0, d1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_i32x4(d0, d1, _MM_SHUFFLE(3, 2, 3, 2)));
    __m512i m23 = _mm512_add_epi32(_mm512_shuffle_i32x4(d2, d3, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_i32x4(d2, d3, _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(m01, m23, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(m01, m23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Groups >= 128: one scale per block and row, cs [4][nb] their products (weight row's x activation row's). */
VNNI static inline void quad_vnni(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sfb, const float *sx0,
                                  int64_t nb, const float *sz, const float *xs0, int64_t G, float *out, const int bits) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    float cs[4 * nb]; /* K / 32 floats on the stack */
    for (int r = 0; r < 4; r++)
        for (int64_t b = 0; b < nb; b += 16) {
            __mmask16 k = nb - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
            _mm512_mask_storeu_ps(cs + r * nb + b, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sfb + b),
                                                                   _mm512_maskz_loadu_ps(k, sx0 + r * nb + b)));
        }
#define LVQ_D(r, b, lo, hi)                                                                                \
    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)(x0 + (r) * K + (b) * BLK))), \
                        hi, _mm512_loadu_si512((const void *)(x0 + (r) * K + (b) * BLK + 64)))
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m512i l0, h0, l1, h1, l2, h2, l3, h3;
        load_w512(wr, b, bits, &l0, &h0), load_w512(wr, b + 1, bits, &l1, &h1);
        load_w512(wr, b + 2, bits, &l2, &h2), load_w512(wr, b + 3, bits, &l3, &h3);
#define LVQ_ROW(r, A)                                                                                      \
    {                                                                                                      \
        __m512i m = merge4(LVQ_D(r, b, l0, h0), LVQ_D(r, b + 1, l1, h1), LVQ_D(r, b + 2, l2, h2),          \
                           LVQ_D(r, b + 3, l3, h3));                                                       \
        __m512 c = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(cs + (r) * nb + b))); \
        A = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), c, A);                                                  \
    }
        LVQ_ROW(0, a0) LVQ_ROW(1, a1) LVQ_ROW(2, a2) LVQ_ROW(3, a3)
#undef LVQ_ROW
    }
    for (; b < nb; b++) {
        __m512i lo, hi;
        load_w512(wr, b, bits, &lo, &hi);
#define LVQ_ROW(r, A) A = _mm512_fmadd_ps(_mm512_cvtepi32_ps(LVQ_D(r, b, lo, hi)), _mm512_set1_ps(cs[(r) * nb + b]), A);
        LVQ_ROW(0, a0) LVQ_ROW(1, a1) LVQ_ROW(2, a2) LVQ_ROW(3, a3)
#undef LVQ_ROW
    }
#undef LVQ_D
    quad_finish(fold512(a0), fold512(a1), fold512(a2), fold512(a3), sz, xs0, G, out);
}

/* Groups of 32/64, a block's two vpdpbusd halves (lanes 0-7 / 8-15 of each: its 32-input parts 0, 1 / 2, 3)
 * summed to 4 lanes a part, part c in 128-bit chunk c. */
VNNI static inline __m512i parts4(__m512i dl, __m512i dh) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(dl, dh, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(dl, dh, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Adjacent lanes summed, per 128-bit chunk: [a0 + a1, a2 + a3, b0 + b1, b2 + b3]. */
VNNI static inline __m512i pairsum(__m512i a, __m512i b) {
    __m512 fa = _mm512_castsi512_ps(a), fb = _mm512_castsi512_ps(b);
    return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(fa, fb, _MM_SHUFFLE(2, 0, 2, 0))),
                            _mm512_castps_si512(_mm512_shuffle_ps(fa, fb, _MM_SHUFFLE(3, 1, 3, 1))));
}

/* One block of one activation row (xb) against its codes lo, hi: part c's 32-input dot product in 4 lanes of chunk c. */
VNNI static inline __m512i parts_vnni(__m512i lo, __m512i hi, const int8_t *xb) {
    const __m512i zero = _mm512_setzero_si512();
    return parts4(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)xb)),
                  _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512((const void *)(xb + 64))));
}

/* Groups of 32 or 64: sw4 [nb][4] the scales of each block's four 32-input parts. Four blocks at a time, their
 * parts summed by shuffles into one vector (parts4, pairsum) for one convert and one FMA, as in quad_vnni; a
 * block left over takes its two halves with their own accumulators and lane scales. */
VNNI static inline void quad_vnni_small(const uint8_t *wr, const int8_t *x0, int64_t K, const float *sw4,
                                        const float *sx0, int64_t nb, const float *sz, const float *xs0, int64_t G,
                                        float *out, const int bits) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i ilo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i ihi = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
    /* lane 4c + j of the four-block loop: part c of block b + j */
    const __m512i tr = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    const __m512i rep = _mm512_set_epi32(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        __m512i l0, h0, l1, h1, l2, h2, l3, h3;
        load_w512(wr, b, bits, &l0, &h0), load_w512(wr, b + 1, bits, &l1, &h1);
        load_w512(wr, b + 2, bits, &l2, &h2), load_w512(wr, b + 3, bits, &l3, &h3);
        const __m512 sw = _mm512_permutexvar_ps(tr, _mm512_loadu_ps(sw4 + 4 * b));
#define LVQ_ROW(r, A)                                                                                           \
    {                                                                                                           \
        const int8_t *xb = x0 + (r) * K + b * BLK;                                                              \
        __m512i e0 = parts_vnni(l0, h0, xb), e1 = parts_vnni(l1, h1, xb + BLK);                                 \
        __m512i e2 = parts_vnni(l2, h2, xb + 2 * BLK), e3 = parts_vnni(l3, h3, xb + 3 * BLK);                   \
        __m512 sxr = _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(_mm_loadu_ps(sx0 + (r) * nb + b)));     \
        A = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pairsum(pairsum(e0, e1), pairsum(e2, e3))), _mm512_mul_ps(sw, sxr), A); \
    }
        LVQ_ROW(0, a0) LVQ_ROW(1, a1) LVQ_ROW(2, a2) LVQ_ROW(3, a3)
#undef LVQ_ROW
    }
    for (; b < nb; b++) {
        __m512i lo, hi;
        load_w512(wr, b, bits, &lo, &hi);
        const __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(sw4 + 4 * b));
        const __m512 sl = _mm512_permutexvar_ps(ilo, s4), sh = _mm512_permutexvar_ps(ihi, s4);
#define LVQ_ROW(r, A, C)                                                                                      \
    {                                                                                                         \
        const int8_t *xb = x0 + (r) * K + b * BLK;                                                            \
        __m512 sb = _mm512_set1_ps(sx0[(r) * nb + b]);                                                        \
        __m512i dl = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)xb));                     \
        __m512i dh = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512((const void *)(xb + 64)));              \
        A = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_mul_ps(sl, sb), A);                                \
        C = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_mul_ps(sh, sb), C);                                \
    }
        LVQ_ROW(0, a0, c0) LVQ_ROW(1, a1, c1) LVQ_ROW(2, a2, c2) LVQ_ROW(3, a3, c3)
#undef LVQ_ROW
    }
    quad_finish(fold512(_mm512_add_ps(a0, c0)), fold512(_mm512_add_ps(a1, c1)), fold512(_mm512_add_ps(a2, c2)),
                fold512(_mm512_add_ps(a3, c3)), sz, xs0, G, out);
}

LVQ_QUAD_AS(VNNI, quad_vnni_q4, quad_vnni, 4)
LVQ_QUAD_AS(VNNI, quad_vnni_q8, quad_vnni, 8)
LVQ_QUAD_AS(VNNI, quad_vnni_small_q4, quad_vnni_small, 4)
LVQ_QUAD_AS(VNNI, quad_vnni_small_q8, quad_vnni_small, 8)

/* Prompts of many rows on AVX512-VNNI: the tile's 32 weight rows are first copied into two panels of 16 rows,
 * interleaved so that one vector holds four inputs of each of 16 rows. vpdpbusd of that vector with four
 * activations broadcast then sums each row's dot product in its own lane: no per-block shuffles to merge
 * lanes (quad_vnni's cost), one convert and FMA per 16 rows and group. Measured on Ice Lake, one core, the
 * loops alone: 4-bit g128 ~145 GMAC/s (four rows) and ~170 (eight) against quad_vnni's ~80, g32 ~94 against
 * ~59. The copy pays for itself from a few rows on, measured against quad_vnni/quad_vnni_small (2 threads,
 * 4096 and 27392 x 4096): from 8 rows (groups >= 64; 0.94-1.04x at 8, 1.3x at 12-16), from 16 (groups of 32). */
static int64_t panel_rows(int group) { return group == 32 ? 16 : 8; }

/* r[j] (row j, 16 dwords) -> r[c] (dword c of each row): a 16x16 transpose of 32-bit words. */
VNNI static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) /* per 128-bit lane L: rows 2i, 2i+1 interleaved, dwords 4L.. (even t), 4L+2.. (odd) */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]), t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    for (int i = 0; i < 4; i++) { /* r[4i + e], lane L: dword 4L + e of rows 4i..4i+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int e = 0; e < 4; e++) { /* dword 4L + e: lane L of r[e], r[4 + e], r[8 + e], r[12 + e] */
        __m512i a = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x88), b = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xDD);
        __m512i c = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x88), d = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xDD);
        t[e] = _mm512_shuffle_i32x4(a, c, 0x88), t[8 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);
        t[4 + e] = _mm512_shuffle_i32x4(b, d, 0x88), t[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Pack the tile's rows [t0, t1) (at most 32) into two 16-row panels of codes, one byte each: per block b and
 * chunk c (0-15), panel p has two vectors, lane j of the first holding inputs 4c..4c+3 of row t0 + 16p + j
 * (lo), of the second inputs 64 + 4c.. (hi). Rows past t1 are zeros. A transpose of 32-bit words per 16 rows
 * and 64 bytes (a gather per vector took ~3x as long); 4-bit codes are unpacked here, once per tile, rather
 * than in the loops: one loop serves both widths (4-bit prompt GEMMs 1.00-1.06x, measured paired). */
VNNI static void pack_panels(const uint8_t *w, int64_t rowbytes, int64_t t0, int64_t t1, int64_t nb, int bits,
                             uint8_t *pk) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 2; p++) {
        int64_t r0 = t0 + 16 * p, nr = t1 - r0;
        for (int64_t b = 0; b < nb; b++)
            for (int h = 0; h < (bits == 4 ? 1 : 2); h++) { /* 4-bit: lo and hi in one 64 bytes; 8-bit: lo, then hi */
                __m512i r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = j < nr ? _mm512_loadu_si512((const void *)(w + (r0 + j) * rowbytes + (b * (bits / 4) + h) * 64))
                                  : _mm512_setzero_si512();
                transpose16(r);
                for (int c = 0; c < 16; c++) {
                    uint8_t *o = pk + ((b * 16 + c) * 2 + p) * 128;
                    if (bits == 4) {
                        _mm512_storeu_si512((void *)o, _mm512_and_si512(r[c], m4));
                        _mm512_storeu_si512((void *)(o + 64), _mm512_and_si512(_mm512_srli_epi16(r[c], 4), m4));
                    } else {
                        _mm512_storeu_si512((void *)(o + 64 * h), r[c]);
                    }
                }
            }
    }
}

/* Fetch, for writing, the lines that rows [m, m + rows) of y take at columns [t0, t1) while a panel loop computes
 * them: put_row's stores otherwise waited on each line's read for ownership (~4% of a prompt, half of it there). */
VNNI static inline void prefetch_out(out_t y, int64_t m, int rows, int64_t N, int64_t t0, int64_t t1) {
    const int64_t es = y.t == 1 ? 2 : 4;
    for (int i = 0; i < rows; i++) {
        const char *a = (const char *)y.p + ((m + i) * N + t0) * es, *e = (const char *)y.p + ((m + i) * N + t1) * es;
        for (const char *c = (const char *)((uintptr_t)a & ~(uintptr_t)63); c < e; c += 64)
            __asm__ volatile("prefetchw %0" : : "m"(*c));
    }
}

/* Chunk c of block b, both panels: the codes of inputs 4c.. (lo) and 64 + 4c.. (hi). */
VNNI static inline void panel_chunk(const uint8_t *pk, int64_t b, int c, __m512i *lo0, __m512i *hi0, __m512i *lo1,
                                    __m512i *hi1) {
    const uint8_t *q = pk + (b * 16 + c) * 256;
    *lo0 = _mm512_loadu_si512((const void *)q), *hi0 = _mm512_loadu_si512((const void *)(q + 64));
    *lo1 = _mm512_loadu_si512((const void *)(q + 128)), *hi1 = _mm512_loadu_si512((const void *)(q + 192));
}

/* F [rows][32] -= the zero-point term sum_g sz[g][n] * xs[r][g]. The rows' sums run side by side (one chain
 * per row and panel): a chain per row, group after group, waited on FMA latency for ~20% of panel8's time. */
VNNI __attribute__((always_inline)) static inline void panel_zero_terms(float *F, const int rows, const float *sz,
                                                                       const float *xs, int64_t G) {
    __m512 f[16];
    for (int i = 0; i < 2 * rows; i++) f[i] = _mm512_loadu_ps(F + 16 * i);
    for (int64_t g = 0; g < G; g++) {
        const __m512 z0 = _mm512_loadu_ps(sz + g * 32), z1 = _mm512_loadu_ps(sz + g * 32 + 16);
        for (int r = 0; r < rows; r++) {
            const __m512 x = _mm512_set1_ps(xs[r * G + g]);
            f[2 * r] = _mm512_fnmadd_ps(z0, x, f[2 * r]), f[2 * r + 1] = _mm512_fnmadd_ps(z1, x, f[2 * r + 1]);
        }
    }
    for (int i = 0; i < 2 * rows; i++) _mm512_storeu_ps(F + 16 * i, f[i]);
}

/* F += (cvt(l) * swl + cvt(h) * swh) * s: one accumulator pair's groups, times the activation row's block scale.
 * same: l and h share the scale swl (groups >= 128), one accumulator's worth (h may be zero). */
VNNI static inline void conv_f(float *F, __m512i l, __m512i h, const float *swl, const float *swh, float s,
                               const int same) {
    if (same) {
        _mm512_storeu_ps(F, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(l, h)),
                                            _mm512_mul_ps(_mm512_loadu_ps(swl), _mm512_set1_ps(s)), _mm512_loadu_ps(F)));
        return;
    }
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_loadu_ps(swh),
                               _mm512_mul_ps(_mm512_cvtepi32_ps(l), _mm512_loadu_ps(swl)));
    _mm512_storeu_ps(F, _mm512_fmadd_ps(v, _mm512_set1_ps(s), _mm512_loadu_ps(F)));
}

/* acc += u8 a . s8 b, in place: through the intrinsic gcc copied every accumulator at each step (48 moves per
 * 16 vpdpbusd), as it did with accumulators in arrays, hence the sixteen named ones below. */
#define LVQ_DP(acc, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
/* activation row X's four inputs at o (lo) and o + 64 (hi) into the accumulators of its lo (L0, L1: panels 0, 1)
 * and hi (H0, H1) codes; the eight-row loop passes each row's one pair twice */
#define LVQ_ROW4(X, L0, L1, H0, H1)                                                   \
    {                                                                                 \
        __m512i xl = _mm512_set1_epi32(*(const int32_t *)(X + o));                    \
        __m512i xh = _mm512_set1_epi32(*(const int32_t *)(X + o + 64));               \
        LVQ_DP(L0, lo0, xl) LVQ_DP(L1, lo1, xl) LVQ_DP(H0, hi0, xh) LVQ_DP(H1, hi1, xh) \
    }

/* Four activation rows (x0, K apart) against the packed tile, any group size: sw, sz [G][32] the tile rows'
 * scales and scale x zero per group, F [4][32] the outputs. Groups of 32 take a step of 8 chunks, where the
 * lo and hi accumulators each stay within one group; otherwise a block's 16. */
VNNI __attribute__((always_inline)) static inline void panel_quad(const uint8_t *pk, const int8_t *x0, int64_t K,
                                                                 int64_t nb, const float *sw, const float *sz,
                                                                 const float *sx0, const float *xs0, int64_t G,
                                                                 float *F, const int gc) {
    for (int i = 0; i < 128; i += 16) _mm512_storeu_ps(F + i, _mm512_setzero_ps());
    const int64_t bpg = G < nb ? nb / G : 1;
    const int8_t *x1 = x0 + K, *x2 = x0 + 2 * K, *x3 = x0 + 3 * K;
    const int CH = gc == 32 ? 8 : 16;
    for (int64_t st = 0; st < nb * (16 / CH); st++) {
        const int64_t b = st * CH / 16;
        const int c0 = (int)(st * CH % 16);
        __m512i L00, L01, L10, L11, L20, L21, L30, L31, H00, H01, H10, H11, H20, H21, H30, H31;
        L00 = L01 = L10 = L11 = L20 = L21 = L30 = L31 = _mm512_setzero_si512();
        H00 = H01 = H10 = H11 = H20 = H21 = H30 = H31 = _mm512_setzero_si512();
        for (int c = c0; c < c0 + CH; c++) {
            __m512i lo0, hi0, lo1, hi1;
            panel_chunk(pk, b, c, &lo0, &hi0, &lo1, &hi1);
            const int64_t o = b * BLK + 4 * c;
            LVQ_ROW4(x0, L00, L01, H00, H01) LVQ_ROW4(x1, L10, L11, H10, H11)
            LVQ_ROW4(x2, L20, L21, H20, H21) LVQ_ROW4(x3, L30, L31, H30, H31)
        }
        /* the groups of the lo / hi accumulators */
        const float *swl = gc == 32 ? sw + (b * 4 + c0 / 8) * 32 : gc == 64 ? sw + 2 * b * 32 : sw + (b / bpg) * 32;
        const float *swh = gc == 32 ? swl + 2 * 32 : gc == 64 ? swl + 32 : swl;
#define LVQ_C(r, L0, L1, H0, H1)                                                      \
    conv_f(F + 32 * r, L0, H0, swl, swh, sx0[r * nb + b], gc >= 128);                  \
    conv_f(F + 32 * r + 16, L1, H1, swl + 16, swh + 16, sx0[r * nb + b], gc >= 128);
        LVQ_C(0, L00, L01, H00, H01) LVQ_C(1, L10, L11, H10, H11)
        LVQ_C(2, L20, L21, H20, H21) LVQ_C(3, L30, L31, H30, H31)
#undef LVQ_C
    }
    panel_zero_terms(F, 4, sz, xs0, G);
}

/* Eight activation rows for groups of 128 and more, where a block's lo and hi halves share a scale and so an
 * accumulator: the sixteen accumulators serve twice the rows, halving the panel loads per vpdpbusd (measured
 * 1.07-1.10x over two panel_quad calls, prompt GEMMs of ChatGLM3-6B's shapes, codes then unpacked in the loop). */
VNNI __attribute__((always_inline)) static inline void panel_oct(const uint8_t *pk, const int8_t *x0, int64_t K,
                                                                int64_t nb, const float *sw, const float *sz,
                                                                const float *sx0, const float *xs0, int64_t G,
                                                                float *F) {
    for (int i = 0; i < 256; i += 16) _mm512_storeu_ps(F + i, _mm512_setzero_ps());
    const int64_t bpg = G < nb ? nb / G : 1;
    const int8_t *x1 = x0 + K, *x2 = x0 + 2 * K, *x3 = x0 + 3 * K, *x4 = x0 + 4 * K, *x5 = x0 + 5 * K,
                 *x6 = x0 + 6 * K, *x7 = x0 + 7 * K;
    for (int64_t b = 0; b < nb; b++) {
        __m512i A00, A01, A10, A11, A20, A21, A30, A31, A40, A41, A50, A51, A60, A61, A70, A71;
        A00 = A01 = A10 = A11 = A20 = A21 = A30 = A31 = _mm512_setzero_si512();
        A40 = A41 = A50 = A51 = A60 = A61 = A70 = A71 = _mm512_setzero_si512();
        for (int c = 0; c < 16; c++) {
            __m512i lo0, hi0, lo1, hi1;
            panel_chunk(pk, b, c, &lo0, &hi0, &lo1, &hi1);
            const int64_t o = b * BLK + 4 * c;
            LVQ_ROW4(x0, A00, A01, A00, A01) LVQ_ROW4(x1, A10, A11, A10, A11)
            LVQ_ROW4(x2, A20, A21, A20, A21) LVQ_ROW4(x3, A30, A31, A30, A31)
            LVQ_ROW4(x4, A40, A41, A40, A41) LVQ_ROW4(x5, A50, A51, A50, A51)
            LVQ_ROW4(x6, A60, A61, A60, A61) LVQ_ROW4(x7, A70, A71, A70, A71)
        }
        const float *s0 = sw + (b / bpg) * 32;
        const __m512i z = _mm512_setzero_si512();
#define LVQ_C(r, A0, A1)                                                                                       \
    conv_f(F + 32 * r, A0, z, s0, s0, sx0[r * nb + b], 1);                                                      \
    conv_f(F + 32 * r + 16, A1, z, s0 + 16, s0 + 16, sx0[r * nb + b], 1);
        LVQ_C(0, A00, A01) LVQ_C(1, A10, A11) LVQ_C(2, A20, A21) LVQ_C(3, A30, A31)
        LVQ_C(4, A40, A41) LVQ_C(5, A50, A51) LVQ_C(6, A60, A61) LVQ_C(7, A70, A71)
#undef LVQ_C
    }
    panel_zero_terms(F, 8, sz, xs0, G);
}
#undef LVQ_ROW4

/* One compiled copy per group class (32, 64, or multiples of 128), and the eight-row loop. */
typedef void (*panel_fn)(const uint8_t *, const int8_t *, int64_t, int64_t, const float *, const float *,
                         const float *, const float *, int64_t, float *);
#define LVQ_PANEL_AS(name, call)                                                                                  \
    VNNI static void name(const uint8_t *pk, const int8_t *x, int64_t K, int64_t nb, const float *sw,              \
                          const float *sz, const float *sx, const float *xs, int64_t G, float *out) {              \
        call;                                                                                                      \
    }
LVQ_PANEL_AS(panel_g32, panel_quad(pk, x, K, nb, sw, sz, sx, xs, G, out, 32))
LVQ_PANEL_AS(panel_g64, panel_quad(pk, x, K, nb, sw, sz, sx, xs, G, out, 64))
LVQ_PANEL_AS(panel_g128, panel_quad(pk, x, K, nb, sw, sz, sx, xs, G, out, 128))
LVQ_PANEL_AS(panel8, panel_oct(pk, x, K, nb, sw, sz, sx, xs, G, out))

/* Decode on AVX512-VNNI, groups >= 128: pair_q4_avx2's loop with each block's dot product taken by vpdpbusd
 * on 256-bit vectors (512-bit ones ran this memory-bound loop ~40% slower on Ice Lake, measured). */
VNNI static inline __m256i dot_vnni(const uint8_t *wb, xblock x, const int bits) {
    __m256i l0, l1, h0, h1;
    if (bits == 4) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256i va = _mm256_loadu_si256((const __m256i *)wb), vb = _mm256_loadu_si256((const __m256i *)(wb + 32));
        l0 = _mm256_and_si256(va, m4), l1 = _mm256_and_si256(vb, m4);
        h0 = _mm256_and_si256(_mm256_srli_epi16(va, 4), m4), h1 = _mm256_and_si256(_mm256_srli_epi16(vb, 4), m4);
    } else {
        l0 = _mm256_loadu_si256((const __m256i *)wb), l1 = _mm256_loadu_si256((const __m256i *)(wb + 32));
        h0 = _mm256_loadu_si256((const __m256i *)(wb + 64)), h1 = _mm256_loadu_si256((const __m256i *)(wb + 96));
    }
    __m256i z = _mm256_setzero_si256();
    return _mm256_add_epi32(_mm256_dpbusd_epi32(_mm256_dpbusd_epi32(z, l0, x.v[0]), l1, x.v[1]),
                            _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(z, h0, x.v[2]), h1, x.v[3]));
}

/* Decode on AVX512-VNNI with one 128-input block per group: both rows' block coefficients (scale x the
 * activations' block scale) and zero-point terms in one pass, 16 groups at a time with a masked tail, where
 * row_prep_avx2 took 8 at a time, a row per call and a scalar tail (13696 inputs = 107 groups): it was 9% of a
 * decode step. The VNNI loops take the codes as they are (no 128 shift). */
VNNI static void pair_prep_vnni(const uint16_t *s0, const uint8_t *z0, const uint16_t *s1, const uint8_t *z1,
                                const float *sxm, const float *xs, int64_t G, float *cs0, float *cs1, float *c0,
                                float *c1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (int64_t g = 0; g < G; g += 16) {
        __mmask16 m = G - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(m, xs + g), sx = _mm512_maskz_loadu_ps(m, sxm + g);
        __m512 f0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s0 + g));
        __m512 f1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s1 + g));
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z0 + g)));
        __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z1 + g)));
        a0 = _mm512_fmadd_ps(_mm512_mul_ps(f0, q0), x, a0);
        a1 = _mm512_fmadd_ps(_mm512_mul_ps(f1, q1), x, a1);
        _mm512_mask_storeu_ps(cs0 + g, m, _mm512_mul_ps(f0, sx));
        _mm512_mask_storeu_ps(cs1 + g, m, _mm512_mul_ps(f1, sx));
    }
    *c0 = _mm512_reduce_add_ps(a0);
    *c1 = _mm512_reduce_add_ps(a1);
}

VNNI static inline void pair_vnni256(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0,
                                     const float *c1, int64_t nb, float *r0, float *r1, const int bits) {
    const int64_t RB = bits == 4 ? 64 : BLK;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = 0;
#define LVQ_STEP(A, B, i)                                                                                   \
    {                                                                                                       \
        xblock x = load_x(xm + (i) * BLK);                                                                  \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_vnni(w0 + (i) * RB, x, bits)), _mm256_set1_ps(c0[i]), A); \
        B = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_vnni(w1 + (i) * RB, x, bits)), _mm256_set1_ps(c1[i]), B); \
    }
    for (; i + 2 <= nb; i += 2) {
        for (int64_t j = 0; j < 2 * RB; j += 64) {
            pf(w0 + i * RB + j + pf_ahead);
            pf(w1 + i * RB + j + pf_ahead);
        }
        LVQ_STEP(a0, b0, i)
        LVQ_STEP(a1, b1, i + 1)
    }
    for (; i < nb; i++) LVQ_STEP(a0, b0, i)
#undef LVQ_STEP
    *r0 = hsum256(_mm256_add_ps(a0, a1));
    *r1 = hsum256(_mm256_add_ps(b0, b1));
}

VNNI static void pair_vnni_q4(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0, const float *c1,
                              int64_t nb, float *r0, float *r1) {
    pair_vnni256(xm, w0, w1, c0, c1, nb, r0, r1, 4);
}
VNNI static void pair_vnni_q8(const int8_t *xm, const uint8_t *w0, const uint8_t *w1, const float *c0, const float *c1,
                              int64_t nb, float *r0, float *r1) {
    pair_vnni256(xm, w0, w1, c0, c1, nb, r0, r1, 8);
}

/* Prompts on AVX2 or AVX512-VNNI (vnni = 1): rows [n0, n1) of y for M activation rows. */
AVX2 static void prompt_tiles(const int8_t *xq, const float *sx, const float *xsum, int64_t M, int64_t K,
                              const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int bits, int group,
                              int64_t n0, int64_t n1, int64_t N, const float *bias, out_t y, int vnni) {
    int64_t nb = K / BLK, G = K / group, rowbytes = bits == 4 ? K / 2 : K;
    float *sf = (float *)malloc(sizeof(float) * G), *cs = (float *)malloc(sizeof(float) * nb);
    const float zs = bits == 8 ? 128.f : 0.f; /* see part_q8; the VNNI loops take the codes as they are */
    /* Prompts: 32 weight rows (at most 32 KiB of 8-bit codes) stay in L1/L2 while every activation
     * row passes over them, so each weight byte is fetched from memory once per call. */
    int64_t bpg = group / BLK;
    float *tsf = (float *)malloc(sizeof(float) * 64 * G), *tsz = tsf + 32 * G; /* the tile's rows' halves */
    /* per block: its scale when groups span blocks (tsb); with groups of 64, each block's four lane scales */
    float *tsb = bpg > 1 || group == 64 ? (float *)malloc(sizeof(float) * 32 * 4 * nb) : tsf;
    void (*quad)(const uint8_t *, const int8_t *, int64_t, const float *, const float *, int64_t, const float *,
                 const float *, int64_t, float *) =
        vnni ? (group >= BLK ? (bits == 4 ? quad_vnni_q4 : quad_vnni_q8)
                             : (bits == 4 ? quad_vnni_small_q4 : quad_vnni_small_q8))
        : group >= BLK ? (bits == 4 ? quad_q4 : quad_q8)
        : group == 64  ? (bits == 4 ? quad_q4_g64 : quad_q8_g64)
                       : (bits == 4 ? quad_q4_g32 : quad_q8_g32);
    int64_t ts = group >= BLK ? nb : 4 * nb; /* tsb floats per row */
    /* VNNI prompts of many rows: the tile's panels, their scales and zero terms [G][32] */
    const int panels = vnni && M >= panel_rows(group);
    uint8_t *pk = panels ? (uint8_t *)aligned_alloc(64, (size_t)(32 * K)) : NULL; /* a byte per code */
    float *psw = panels ? (float *)malloc(sizeof(float) * 64 * G) : NULL, *psz = panels ? psw + 32 * G : NULL;
    panel_fn panel = group == 32 ? panel_g32 : group == 64 ? panel_g64 : panel_g128;
    for (int64_t t0 = n0; t0 < n1; t0 += 32) {
        int64_t t1 = t0 + 32 < n1 ? t0 + 32 : n1;
        int64_t m = 0;
        if (M >= LVQ_MR)
            for (int64_t n = t0; n < t1; n++) {
                float *rf = tsf + (n - t0) * G, *rb = tsb + (n - t0) * ts;
                row_scales_avx2(scales + n * G, zeros + n * G, G, vnni ? 0.f : zs, rf, tsz + (n - t0) * G);
                if (panels) continue; /* the panels take the scales transposed, below */
                if (bpg > 1)
                    for (int64_t b = 0; b < nb; b++) rb[b] = rf[b / bpg];
                else if (group == 64)
                    for (int64_t b = 0; b < nb; b++)
                        rb[4 * b] = rb[4 * b + 1] = rf[2 * b], rb[4 * b + 2] = rb[4 * b + 3] = rf[2 * b + 1];
            }
        if (panels) {
            pack_panels(w, rowbytes, t0, t1, nb, bits, pk);
            for (int64_t g = 0; g < G; g++)
                for (int64_t j = 0; j < 32; j++) {
                    psw[g * 32 + j] = j < t1 - t0 ? tsf[j * G + g] : 0.f;
                    psz[g * 32 + j] = j < t1 - t0 ? tsz[j * G + g] : 0.f;
                }
            float r[8][32];
            /* the next tile's weights into L2, a slice per step: pack_panels reads 16 rows side by side, which the
             * hardware prefetchers did not follow (9.5% of a prompt in pack_panels, a quarter of that after) */
            const uint8_t *nx = w + t1 * rowbytes;
            const int64_t nbytes = ((t1 + 32 < n1 ? t1 + 32 : n1) - t1) * rowbytes;
            const int64_t steps = M / (group >= BLK ? 8 : LVQ_MR), slice = (nbytes / (steps ? steps : 1) + 63) & ~(int64_t)63;
            int64_t done = 0;
#define LVQ_PF_NEXT()                                                                              \
    for (int64_t e = done + slice < nbytes ? done + slice : nbytes; done < e; done += 64)         \
        __asm__ volatile("prefetcht1 %0" : : "m"(*(const char *)(nx + done)));
            if (group >= BLK)
                for (; m + 8 <= M; m += 8) {
                    LVQ_PF_NEXT()
                    prefetch_out(y, m, 8, N, t0, t1);
                    panel8(pk, xq + m * K, K, nb, psw, psz, sx + m * nb, xsum + m * G, G, &r[0][0]);
                    for (int i = 0; i < 8; i++) put_row(y, (m + i) * N + t0, r[i], bias ? bias + t0 : NULL, t1 - t0);
                }
            for (; m + LVQ_MR <= M; m += LVQ_MR) {
                LVQ_PF_NEXT()
                prefetch_out(y, m, LVQ_MR, N, t0, t1);
                panel(pk, xq + m * K, K, nb, psw, psz, sx + m * nb, xsum + m * G, G, &r[0][0]);
                for (int i = 0; i < LVQ_MR; i++) put_row(y, (m + i) * N + t0, r[i], bias ? bias + t0 : NULL, t1 - t0);
            }
#undef LVQ_PF_NEXT
        }
        for (; m + LVQ_MR <= M; m += LVQ_MR) {
            float r[LVQ_MR][32]; /* the tile's outputs, written a row at a time (one by one cost 5% of a prompt) */
            for (int64_t n = t0; n < t1; n++) {
                float q[LVQ_MR];
                quad(w + n * rowbytes, xq + m * K, K, tsb + (n - t0) * ts, sx + m * nb, nb, tsz + (n - t0) * G,
                     xsum + m * G, G, q);
                for (int i = 0; i < LVQ_MR; i++) r[i][n - t0] = q[i];
            }
            for (int i = 0; i < LVQ_MR; i++) put_row(y, (m + i) * N + t0, r[i], bias ? bias + t0 : NULL, t1 - t0);
        }
        for (; m < M; m++) {
            const int8_t *xm = xq + m * K;
            for (int64_t n = t0; n < t1; n++) {
                float c = row_prep_avx2(scales + n * G, zeros + n * G, sx + m * nb, xsum + m * G, G, nb, group, sf, cs, zs);
                put(y, m * N + n, row_dot_avx2(w + n * rowbytes, xm, sx + m * nb, sf, cs, nb, bits, group) - c +
                               (bias ? bias[n] : 0.f));
            }
        }
    }
    free(pk);
    free(psw);
    if (tsb != tsf) free(tsb);
    free(tsf);
    free(sf);
    free(cs);
}

/* Decode (one activation row) on AVX2, or with vnni = 1 on AVX512-VNNI for groups >= 128: two weight rows
 * per step, from the two halves of [n0, n1). */
AVX2 static void decode_rows(const int8_t *xq, const float *sx, const float *xsum, int64_t K, const uint8_t *w,
                             const uint16_t *scales, const uint8_t *zeros, int bits, int group, int64_t n0, int64_t n1,
                             const float *bias, out_t y, int vnni) {
    int64_t nb = K / BLK, G = K / group, rowbytes = bits == 4 ? K / 2 : K;
    float *sf = (float *)malloc(sizeof(float) * G), *cs = (float *)malloc(sizeof(float) * nb);
    vnni = vnni && group >= BLK;
    const float zs = bits == 8 ? 128.f : 0.f, zp = vnni ? 0.f : zs; /* see part_q8; pair_vnni256 takes the codes as they are */
    float *sf2 = (float *)malloc(sizeof(float) * G), *cs2 = (float *)malloc(sizeof(float) * nb);
    int64_t h = (n1 - n0) / 2;
    for (int64_t i = 0; i < h; i++) {
        int64_t na = n0 + i, nb2 = n0 + h + i;
        if (i + LVQ_PF_ROWS < h) { /* scales and zeros, ~1/30 of a row's bytes: a DRAM miss each unprefetched */
            pf_range(scales + (na + LVQ_PF_ROWS) * G, 2 * G);
            pf_range(scales + (nb2 + LVQ_PF_ROWS) * G, 2 * G);
            pf_range(zeros + (na + LVQ_PF_ROWS) * G, G);
            pf_range(zeros + (nb2 + LVQ_PF_ROWS) * G, G);
        }
        float c0, c1;
        if (vnni && group == BLK)
            pair_prep_vnni(scales + na * G, zeros + na * G, scales + nb2 * G, zeros + nb2 * G, sx, xsum, G, cs, cs2, &c0, &c1);
        else if (group == BLK)
            pair_prep_avx2(scales + na * G, zeros + na * G, scales + nb2 * G, zeros + nb2 * G, sx, xsum, G, zp, cs, cs2, &c0, &c1);
        else {
            c0 = row_prep_avx2(scales + na * G, zeros + na * G, sx, xsum, G, nb, group, sf, cs, zp);
            c1 = row_prep_avx2(scales + nb2 * G, zeros + nb2 * G, sx, xsum, G, nb, group, sf2, cs2, zp);
        }
        float r0, r1;
        if (group >= BLK) {
            (vnni ? (bits == 4 ? pair_vnni_q4 : pair_vnni_q8) : bits == 4 ? pair_q4_avx2 : pair_q8_avx2)(xq, w + na * rowbytes, w + nb2 * rowbytes, cs, cs2, nb, &r0, &r1);
        } else {
            pair_small_avx2(w + na * rowbytes, w + nb2 * rowbytes, xq, sx, sf, sf2, nb, bits, group, &r0, &r1);
        }
        put(y, na, r0 - c0 + (bias ? bias[na] : 0.f));
        put(y, nb2, r1 - c1 + (bias ? bias[nb2] : 0.f));
    }
    if ((n1 - n0) & 1) {
        int64_t n = n1 - 1;
        float c = row_prep_avx2(scales + n * G, zeros + n * G, sx, xsum, G, nb, group, sf, cs, zs);
        put(y, n, row_dot_avx2(w + n * rowbytes, xq, sx, sf, cs, nb, bits, group) - c + (bias ? bias[n] : 0.f));
    }
    free(sf2);
    free(cs2);
    free(sf);
    free(cs);
}

#endif

/* The portable path: the same arithmetic in plain C. */
static void rows_generic(const int8_t *xq, const float *sx, const float *xsum, int64_t M, int64_t K,
                         const uint8_t *w, const uint16_t *scales, const uint8_t *zeros, int bits, int group,
                         int64_t n0, int64_t n1, int64_t N, const float *bias, out_t y) {
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
            put(y, m * N + n, (float)acc + (bias ? bias[n] : 0.f));
        }
    }
    free(q);
    free(sf);
}

#ifdef LVQ_X86
/* The AVX2 path, or with vnni = 1 the AVX512-VNNI one: the prompt loops on 512-bit vpdpbusd, decode on 256-bit
 * (see pair_vnni256); groups of 32/64 decode and the rows a prompt leaves over (M % 4) on the AVX2 loops. */
static void rows_simd(const int8_t *xq, const float *sx, const float *xsum, int64_t M, int64_t K, const uint8_t *w,
                      const uint16_t *scales, const uint8_t *zeros, int bits, int group, int64_t n0, int64_t n1,
                      int64_t N, const float *bias, out_t y, int vnni) {
    if (M == 1) decode_rows(xq, sx, xsum, K, w, scales, zeros, bits, group, n0, n1, bias, y, vnni);
    else prompt_tiles(xq, sx, xsum, M, K, w, scales, zeros, bits, group, n0, n1, N, bias, y, vnni);
}
#endif

static int check_shape(int64_t K, int bits, int group) {
    if (bits != 4 && bits != 8) return -1;
    if (K % BLK) return -2;
    if (!(group == 32 || group == 64 || (group >= BLK && group % BLK == 0))) return -3;
    if (K % group) return -4;
    return 0;
}

static int gemm(const void *x, int xt, int64_t M, int64_t K, const uint8_t *w, const uint16_t *scales,
                const uint8_t *zeros, int64_t N, int bits, int group, const float *bias, out_t y, int nthreads) {
    int64_t nb = K / BLK, G = K / group;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * K + 127) / 64 * 64));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * G));
    int isa = lvq_isa();
    if (nthreads < 1) nthreads = 1;
    /* a prompt's rows quantized in parallel too (512-row GEMMs 1.01-1.05x on 2 threads; a serial step's share
     * grows with the thread count) */
#pragma omp parallel if (M > 1) num_threads(nthreads)
    {
        float *row = xt == 1 ? (float *)malloc(sizeof(float) * (size_t)K) : NULL; /* one bf16 row as float */
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float *xr = (const float *)x + m * K;
            if (xt == 1) {
                for (int64_t k = 0; k < K; k++) row[k] = bf2f(((const uint16_t *)x)[m * K + k]);
                xr = row;
            }
#ifdef LVQ_X86
            if (isa == ISA_VNNI) quant_x_avx512(xr, K, group, xq + m * K, sx + m * nb, xsum + m * G);
            else if (isa == ISA_AVX2) quant_x_avx2(xr, K, group, xq + m * K, sx + m * nb, xsum + m * G);
            else
#endif
                quant_x(xr, K, group, xq + m * K, sx + m * nb, xsum + m * G);
        }
        free(row);
    }
    /* Rows in chunks handed out dynamically: a thread that loses its core to another process
     * delays one chunk, not half of every matrix (a static split ran 6x slower on a busy core). */
    int64_t chunk = N / ((int64_t)nthreads * 16);
    chunk = chunk < 16 ? 16 : (chunk + 1) & ~(int64_t)1;
    /* prompts work on 32-row tiles (the VNNI panels compute all 32 rows of a tile, filled or not): whole tiles
     * per chunk, or with many threads every 16-row chunk would cost a 32-row one */
    if (M > 1) chunk = (chunk + 31) & ~(int64_t)31;
    int64_t nchunks = (N + chunk - 1) / chunk;
    /* decode: guided chunks (a quarter of what is left per thread pair, down to 16 rows), so the threads
     * finish each matrix within a 16-row chunk of each other instead of a 1/32-of-N one */
    int64_t bounds[257];
    int guided = M == 1;
    if (guided) {
        int64_t a = 0;
        nchunks = 0;
        while (a < N && nchunks < 256) {
            int64_t c = (N - a) / (4 * (int64_t)nthreads);
            c = c < 16 ? 16 : (c + 1) & ~(int64_t)1;
            bounds[nchunks++] = a;
            a += c;
        }
        bounds[nchunks] = N;
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t a = guided ? bounds[c] : c * chunk, e = guided ? bounds[c + 1] : (a + chunk < N ? a + chunk : N);
#ifdef LVQ_X86
        if (isa >= ISA_AVX2)
            rows_simd(xq, sx, xsum, M, K, w, scales, zeros, bits, group, a, e, N, bias, y, isa == ISA_VNNI);
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
    out_t out = {y, ytype};
    return gemm(x, xtype, M, K, w, scales, zeros, N, bits, group, bias, out, nthreads);
}

#ifdef LVQ_X86
static int has_bf16_cpu(void) {
    __builtin_cpu_init();
    return has_vnni_cpu() && __builtin_cpu_supports("avx512bf16");
}

/* AMX tiles with bf16 (CPUID 7.0 EDX bits 22, 24), enabled by the OS (XCR0 bits 17, 18). */
static int has_amx_bf16_cpu(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE, so xgetbv works */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & (3u << 17)) == (3u << 17);
}
#endif

/* 1 where bf16 matrix multiplies are fast (AMX), so prompts are better dequantized to bf16 and
 * multiplied by torch. AVX512-BF16 alone is not enough: on a Zen 5 (2 threads) dequantize + torch's
 * bf16 GEMM took 1.7-4x as long as lvq_gemm on int8 activations at 32-512 rows, and AVX2 CPUs emulate
 * bf16 GEMMs (5-6x slower than fp32). */
int lvq_fast_bf16(void) {
#ifdef LVQ_X86
    return isa_cap >= ISA_VNNI && has_bf16_cpu() && has_amx_bf16_cpu();
#else
    return 0;
#endif
}

#ifdef LVQ_X86

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
    if (lvq_isa() == ISA_VNNI && has_bf16_cpu()) {
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

/* The 8 nibbles of w, nibble m into the low half of byte m. */
static inline uint64_t spread4(uint32_t w) {
    uint64_t x = w;
    x = (x | x << 16) & 0x0000FFFF0000FFFFull;
    x = (x | x << 8) & 0x00FF00FF00FF00FFull;
    return (x | x << 4) & 0x0F0F0F0F0F0F0F0Full;
}

/* GPTQ qweight int32 [K*bits/32][N] (packed along K, low bits first) -> our rows [N][rowbytes].
 * perm (may be NULL): input k of our layout is input perm[k] of the checkpoint (act-order). */
int lvq_repack(const int32_t *qweight, int64_t K, int64_t N, int bits, const int32_t *perm, uint8_t *out,
               int nthreads) {
    if ((bits != 4 && bits != 8) || K % BLK) return -1;
    int64_t rowbytes = bits == 4 ? K / 2 : K, words = BLK * bits / 32; /* int32 words per block per row */
    const int lg = bits == 4 ? 3 : 2; /* log2 of the codes per word */
    const uint32_t mask = (1u << bits) - 1, *qw = (const uint32_t *)qweight;
    if (nthreads < 1) nthreads = 1;
    /* A block (64 or 128 bytes) of 64 output rows at a time, built in an L1 tile from whole source lines:
     * each source word row is read once, 64 words (four lines) in a run, then never again. In checkpoint
     * order that is a transpose of words (8-bit codes are already the row's bytes in order, little-endian)
     * and a nibble spread (4-bit: byte j holds inputs j and 64 + j). Writing bytes column by column
     * instead (64 rows 2 KiB apart, two L1 sets) ran at 0.24 GB/s and was most of a 6B model's load. */
    const int64_t bb = bits == 4 ? 64 : BLK; /* output bytes per block and row */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        uint8_t tile[64][BLK];
        for (int64_t b = 0; b < K / BLK; b++) {
            if (!perm && bits == 8) {
                for (int64_t i = 0; i < words; i++) {
                    const uint32_t *w = qw + (b * words + i) * N;
                    for (int64_t n = n0; n < n1; n++) memcpy(tile[n - n0] + 4 * i, w + n, 4);
                }
            } else if (!perm) {
                for (int64_t i = 0; i < 8; i++) {
                    const uint32_t *lo = qw + (b * words + i) * N, *hi = qw + (b * words + i + 8) * N;
                    for (int64_t n = n0; n < n1; n++) {
                        uint64_t v = spread4(lo[n]) | spread4(hi[n]) << 4;
                        memcpy(tile[n - n0] + 8 * i, &v, 8);
                    }
                }
            } else { /* act-order: input j of the block is input perm[...] of the checkpoint */
                for (int64_t j = 0; j < BLK; j++) {
                    int64_t src = perm[b * BLK + j];
                    const uint32_t *w = qw + (src >> lg) * N;
                    int sh = (int)(src & ((1 << lg) - 1)) * bits;
                    for (int64_t n = n0; n < n1; n++) {
                        uint8_t q = (uint8_t)((w[n] >> sh) & mask);
                        if (bits == 8 || j < 64)
                            tile[n - n0][j] = q;
                        else
                            tile[n - n0][j - 64] |= (uint8_t)(q << 4);
                    }
                }
            }
            for (int64_t n = n0; n < n1; n++) memcpy(out + n * rowbytes + b * bb, tile[n - n0], bb);
        }
    }
    return 0;
}

/* ---- the small ops of one decode step ------------------------------------------------------------
 * A token's step through a block is ~65 torch ops on tiny tensors (norms, RoPE, the cache write,
 * attention over the cache, SwiGLU); at 5-100 us each on this VM's CPUs that was 25-35 ms a token,
 * a fifth of the whole step. These do the same float32 math in one call each. Tensors are float32
 * (type 0) or bf16 (type 1), contiguous. */

static inline float ldf(const void *p, int t, int64_t i) {
    return t == 1 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void stf(void *p, int t, int64_t i, float v) {
    if (t == 1) ((uint16_t *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}

#ifdef LVQ_X86
/* expf on 8 lanes (Cephes' polynomial, ~1 ulp): softmax over a long cache and SiLU call it per element. */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}


AVX2 static void swiglu_bf16_avx2(const uint16_t *h, int64_t n, uint16_t *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = ld8bf(h + i), b = ld8bf(h + n + i);
        __m256 sa = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
        st8bf(y + i, _mm256_mul_ps(sa, b));
    }
    for (; i < n; i++) {
        float a = bf2f(h[i]), b = bf2f(h[n + i]);
        y[i] = f2bf(a / (1.0f + expf(-a)) * b);
    }
}

/* Attention of one bf16 query head over S cached rows of its kv head: o = softmax(q.K^T * scale) V. */
AVX2 static void attend_head_avx2(const float *q, const uint16_t *k, const uint16_t *v, int64_t S, int64_t D,
                                  float scale, float *s, float *acc) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        const uint16_t *kr = k + j * D;
        __m256 a = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), ld8bf(kr + d), a);
        float dot = hsum256(a);
        for (; d < D; d++) dot += q[d] * bf2f(kr[d]);
        s[j] = dot * scale;
        mx = s[j] > mx ? s[j] : mx;
    }
    __m256 sum8 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum256(sum8);
    for (; j < S; j++) sum += (s[j] = expf(s[j] - mx));
    for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
    for (j = 0; j < S; j++) {
        const uint16_t *vr = v + j * D;
        __m256 p = _mm256_set1_ps(s[j] / sum);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(p, ld8bf(vr + d), _mm256_loadu_ps(acc + d)));
        for (; d < D; d++) acc[d] += s[j] / sum * bf2f(vr[d]);
    }
}

/* Eight sums in one vector: lane i = the sum of v[i]'s lanes. */
AVX2 static inline __m256 hsum8x(const __m256 *v) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* A chunk's scores s[0..n): *mx = their max, s[j] = exp(s[j] - max) * vs[j] (vs NULL: 1); returns the sum of the
 * exps. */
AVX2 static float softmax_part_avx2(float *s, int64_t n, const float *vs, float *mx) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    float m4[8], m = -INFINITY;
    _mm256_storeu_ps(m4, m8);
    for (int i = 0; i < 8; i++) m = m4[i] > m ? m4[i] : m; /* not fmaxf: a libm call here (16% of the time) */
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    __m256 sum8 = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(m)));
        sum8 = _mm256_add_ps(sum8, e);
        _mm256_storeu_ps(s + j, vs ? _mm256_mul_ps(e, _mm256_loadu_ps(vs + j)) : e);
    }
    float sum = hsum256(sum8);
    for (; j < n; j++) {
        float e = expf(s[j] - m);
        sum += e;
        s[j] = vs ? e * vs[j] : e;
    }
    *mx = m;
    return sum;
}

/* s[0..S) -> softmax(s), in place. */
AVX2 static void softmax_avx2(float *s, int64_t S) {
    float mx, inv = 1.f / softmax_part_avx2(s, S, NULL, &mx);
    for (int64_t j = 0; j < S; j++) s[j] *= inv;
}

/* Attention of four query heads that share a kv head (GQA: 16 of them in ChatGLM2/3 and GLM-4) over its S
 * cached bf16 rows; q[i], s[i] (S scores) and acc[i] (D outputs) per head, D a multiple of 8. Each key and
 * value row is converted once for the four heads and the dot products run as independent chains (two keys x
 * four heads): one head at a time was latency-bound, 19 ms of a 125 ms ChatGLM3-6B step at 540 tokens. */
AVX2 static void attend4_avx2(float *const *q, const uint16_t *k, const uint16_t *v, int64_t S, int64_t D,
                              float scale, float *const *s, float *const *acc) {
    int64_t j = 0;
    for (; j + 2 <= S; j += 2) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        const uint16_t *k0 = k + j * D, *k1 = k0 + D;
        for (int64_t d = 0; d < D; d += 8) {
            __m256 x0 = ld8bf(k0 + d), x1 = ld8bf(k1 + d);
            for (int h = 0; h < 4; h++) {
                __m256 qh = _mm256_loadu_ps(q[h] + d);
                a[2 * h] = _mm256_fmadd_ps(qh, x0, a[2 * h]);
                a[2 * h + 1] = _mm256_fmadd_ps(qh, x1, a[2 * h + 1]);
            }
        }
        float r[8];
        _mm256_storeu_ps(r, _mm256_mul_ps(hsum8x(a), _mm256_set1_ps(scale)));
        for (int h = 0; h < 4; h++) s[h][j] = r[2 * h], s[h][j + 1] = r[2 * h + 1];
    }
    for (; j < S; j++)
        for (int h = 0; h < 4; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + d), ld8bf(k + j * D + d), a);
            s[h][j] = hsum256(a) * scale;
        }
    for (int h = 0; h < 4; h++) softmax_avx2(s[h], S);
    for (int64_t d = 0; d < D; d += 16) { /* 16 columns of four heads: eight accumulators */
        int two = d + 16 <= D;
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (j = 0; j < S; j++) {
            const uint16_t *vr = v + j * D + d;
            __m256 x0 = ld8bf(vr), x1 = two ? ld8bf(vr + 8) : x0;
            for (int h = 0; h < 4; h++) {
                __m256 p = _mm256_broadcast_ss(s[h] + j);
                a[2 * h] = _mm256_fmadd_ps(p, x0, a[2 * h]);
                a[2 * h + 1] = _mm256_fmadd_ps(p, x1, a[2 * h + 1]);
            }
        }
        for (int h = 0; h < 4; h++) {
            _mm256_storeu_ps(acc[h] + d, a[2 * h]);
            if (two) _mm256_storeu_ps(acc[h] + d + 8, a[2 * h + 1]);
        }
    }
}
#endif

/* RMSNorm of `rows` rows of n: y = x / sqrt(mean(x^2) + eps) * w (weight of type wt). */
int lvq_rmsnorm(const void *x, int xt, const void *w, int wt, int64_t rows, int64_t n, float eps, void *y) {
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) {
            float v = ldf(x, xt, r * n + i);
            ss += (double)(v * v);
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        for (int64_t i = 0; i < n; i++) stf(y, xt, r * n + i, ldf(w, wt, i) * (ldf(x, xt, r * n + i) * inv));
    }
    return 0;
}

/* SwiGLU of `rows` rows of 2n (gate | up): y = silu(gate) * up. A prompt's rows on `nthreads` threads (torch's silu
 * and multiply took two passes and a temporary: ~2% of a 512-token prompt). */
int lvq_swiglu(const void *h, int t, int64_t rows, int64_t n, void *y, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#ifdef LVQ_X86
    if (t == 1 && lvq_isa() >= ISA_AVX2) {
#pragma omp parallel for if (rows >= 16 && nthreads > 1) num_threads(nthreads) schedule(static)
        for (int64_t r = 0; r < rows; r++)
            swiglu_bf16_avx2((const uint16_t *)h + r * 2 * n, n, (uint16_t *)y + r * n);
        return 0;
    }
#endif
#pragma omp parallel for if (rows >= 16 && nthreads > 1) num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) {
            float a = ldf(h, t, r * 2 * n + i), b = ldf(h, t, r * 2 * n + n + i);
            stf(y, t, r * n + i, a / (1.0f + expf(-a)) * b);
        }
    return 0;
}

/* One token's qkv row (type t) before attention: rotate the first `rot` dims of every q and k head by GPT-J
 * pairs with cos/sin [rot/2], in place; rope_cache_row then writes its k and v into slot `slot` of the caches
 * [G][slots][D]. */
static void rope_row(void *qkv, int t, const float *cos, const float *sin, int64_t rot, int64_t H, int64_t G,
                     int64_t D) {
    for (int64_t h = 0; h < H + G; h++) { /* q heads, then k heads */
        int64_t base = h * D;
        for (int64_t j = 0; j < rot / 2; j++) {
            float x0 = ldf(qkv, t, base + 2 * j), x1 = ldf(qkv, t, base + 2 * j + 1);
            stf(qkv, t, base + 2 * j, x0 * cos[j] - x1 * sin[j]);
            stf(qkv, t, base + 2 * j + 1, x1 * cos[j] + x0 * sin[j]);
        }
    }
}

static void rope_cache_row(void *qkv, int t, const float *cos, const float *sin, int64_t rot, int64_t H, int64_t G,
                           int64_t D, void *kc, void *vc, int64_t slots, int64_t slot) {
    rope_row(qkv, t, cos, sin, rot, H, G, D);
    size_t es = t == 1 ? 2 : 4;
    for (int64_t g = 0; g < G; g++) {
        memcpy((char *)kc + ((g * slots + slot) * D) * es, (char *)qkv + ((H + g) * D) * es, D * es);
        memcpy((char *)vc + ((g * slots + slot) * D) * es, (char *)qkv + ((H + G + g) * D) * es, D * es);
    }
}

static int chunk_path(int64_t D);
#ifdef LVQ_X86
static int attend_cached(int path, int kt, const void *qkv, int t, int64_t H, int64_t G, int64_t D, const void *kc,
                         const float *ks, const void *vc, const float *vs, int64_t slots, int64_t S, void *o,
                         int nthreads);
#endif

/* One new token through attention, in place on its qkv row (H query heads, G kv heads, head size D):
 * rotate the first `rot` dims of every q and k head by GPT-J pairs with cos/sin [rot/2], write k and v
 * into slot `slot` of the caches [G][slots][D], then o[h] = softmax(q[h] . K[g]^T / sqrt(D)) V[g]
 * over slots 0..slot, g = h / (H/G). Returns -11 when its scratch cannot be allocated. */
int lvq_attend_one(void *qkv, int t, const float *cos, const float *sin, int64_t rot, int64_t H, int64_t G,
                   int64_t D, void *kc, void *vc, int64_t slots, int64_t slot, void *o, int nthreads) {
    rope_cache_row(qkv, t, cos, sin, rot, H, G, D, kc, vc, slots, slot);
#ifdef LVQ_X86
    /* a bf16 cache on AVX-512: chunked over the threads, the kv head's heads together (on AVX2 the loops below were
     * faster: 35 against 51 ms a ChatGLM3-6B step at 8000 tokens, the AVX2 path timed on a Zen 5) */
    if (t == 1 && chunk_path(D) == 2)
        return attend_cached(2, 1, qkv, t, H, G, D, kc, NULL, vc, NULL, slots, slot + 1, o, nthreads);
#endif
    int64_t S = slot + 1, per = H / G;
    float scale = 1.0f / sqrtf((float)D);
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
#endif
    if (nthreads < 1 || S * H * D < (1 << 20)) nthreads = 1; /* short caches: not worth waking threads */
    float *buf = (float *)malloc(sizeof(float) * H * (2 * D + S)); /* per head: q, acc, scores */
    if (!buf) return -11;
    /* Tasks of four heads of one kv head (attend4_avx2), else of one head; quads = four-head tasks per kv head. */
    int64_t quads = 0;
#ifdef LVQ_X86
    if (t == 1 && D % 8 == 0 && lvq_isa() >= ISA_AVX2) quads = per / 4;
#endif
    int64_t singles = per - 4 * quads, tasks = G * (quads + singles);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        int64_t g = task / (quads + singles), i = task % (quads + singles);
        int64_t h0 = g * per + (i < quads ? 4 * i : 4 * quads + (i - quads)), nh = i < quads ? 4 : 1;
        float *q[4], *acc[4], *s[4];
        for (int64_t u = 0; u < nh; u++) {
            q[u] = buf + (h0 + u) * (2 * D + S), acc[u] = q[u] + D, s[u] = acc[u] + D;
            for (int64_t d = 0; d < D; d++) q[u][d] = ldf(qkv, t, (h0 + u) * D + d);
        }
#ifdef LVQ_X86
        const uint16_t *kg = (const uint16_t *)kc + g * slots * D, *vg = (const uint16_t *)vc + g * slots * D;
        if (nh == 4) {
            attend4_avx2(q, kg, vg, S, D, scale, s, acc);
            for (int64_t u = 0; u < 4; u++)
                for (int64_t d = 0; d < D; d++) stf(o, t, (h0 + u) * D + d, acc[u][d]);
            continue;
        }
        if (t == 1 && lvq_isa() >= ISA_AVX2) {
            attend_head_avx2(q[0], kg, vg, S, D, scale, s[0], acc[0]);
            for (int64_t d = 0; d < D; d++) stf(o, t, h0 * D + d, acc[0][d]);
            continue;
        }
#endif
        float mx = -INFINITY, *qh = q[0], *sh = s[0], *ah = acc[0];
        memset(ah, 0, sizeof(float) * D);
        for (int64_t j = 0; j < S; j++) {
            float dot = 0.f;
            int64_t kb = (g * slots + j) * D;
            if (t == 1) {
                const uint16_t *kr = (const uint16_t *)kc + kb;
                for (int64_t d = 0; d < D; d++) dot += qh[d] * bf2f(kr[d]);
            } else {
                const float *kr = (const float *)kc + kb;
                for (int64_t d = 0; d < D; d++) dot += qh[d] * kr[d];
            }
            sh[j] = dot * scale;
            mx = fmaxf(mx, sh[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < S; j++) sum += (sh[j] = expf(sh[j] - mx));
        for (int64_t j = 0; j < S; j++) {
            float p = sh[j] / sum;
            int64_t vb = (g * slots + j) * D;
            if (t == 1) {
                const uint16_t *vr = (const uint16_t *)vc + vb;
                for (int64_t d = 0; d < D; d++) ah[d] += p * bf2f(vr[d]);
            } else {
                const float *vr = (const float *)vc + vb;
                for (int64_t d = 0; d < D; d++) ah[d] += p * vr[d];
            }
        }
        for (int64_t d = 0; d < D; d++) stf(o, t, h0 * D + d, ah[d]);
    }
    free(buf);
    return 0;
}

#ifdef LVQ_X86
/* A prompt chunk's keys and values of one kv head as float, once per layer for every row and head: K in blocks
 * of 32 keys, kt[b][d][32] (zeros past S), so a block's scores are broadcast-q FMAs over contiguous rows with no
 * horizontal sums; V as vf[S][D]. */
static void kv_float(const uint16_t *k, const uint16_t *v, int64_t S, int64_t D, float *kt, float *vf) {
    for (int64_t b = 0; b < (S + 31) / 32; b++)
        for (int64_t d = 0; d < D; d++)
            for (int64_t u = 0; u < 32; u++) {
                int64_t j = 32 * b + u;
                kt[(b * D + d) * 32 + u] = j < S ? bf2f(k[j * D + d]) : 0.f;
            }
    for (int64_t j = 0; j < S * D; j++) vf[j] = bf2f(v[j]);
}

/* Four heads of one row over the first S keys of kv_float's tables (D a multiple of 64): scores, softmax,
 * then acc[h] = p[h] V. s[h] holds S rounded up to 32. Two key vectors x four heads and four output vectors
 * x four heads keep eight and sixteen accumulators in flight (attend4_avx2 did a horizontal sum per key). */
VNNI static void attend4_avx512(float *const *q, const float *kt, const float *vf, int64_t S, int64_t D, float scale,
                                float *const *s, float *const *acc) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t b = 0; b < (S + 31) / 32; b++) {
        __m512 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
        const float *c = kt + b * D * 32;
        for (int64_t d = 0; d < D; d++, c += 32) {
            const __m512 k0 = _mm512_loadu_ps(c), k1 = _mm512_loadu_ps(c + 16);
            for (int h = 0; h < 4; h++) {
                const __m512 qh = _mm512_set1_ps(q[h][d]);
                a[2 * h] = _mm512_fmadd_ps(qh, k0, a[2 * h]);
                a[2 * h + 1] = _mm512_fmadd_ps(qh, k1, a[2 * h + 1]);
            }
        }
        for (int h = 0; h < 4; h++) {
            _mm512_storeu_ps(s[h] + 32 * b, _mm512_mul_ps(a[2 * h], sc));
            _mm512_storeu_ps(s[h] + 32 * b + 16, _mm512_mul_ps(a[2 * h + 1], sc));
        }
    }
    for (int h = 0; h < 4; h++) softmax_avx2(s[h], S);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        __m512 a[16];
        for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; j++) {
            const float *vr = vf + j * D + d0;
            const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                         v3 = _mm512_loadu_ps(vr + 48);
            for (int h = 0; h < 4; h++) {
                const __m512 p = _mm512_set1_ps(s[h][j]);
                a[4 * h] = _mm512_fmadd_ps(p, v0, a[4 * h]);
                a[4 * h + 1] = _mm512_fmadd_ps(p, v1, a[4 * h + 1]);
                a[4 * h + 2] = _mm512_fmadd_ps(p, v2, a[4 * h + 2]);
                a[4 * h + 3] = _mm512_fmadd_ps(p, v3, a[4 * h + 3]);
            }
        }
        for (int h = 0; h < 4; h++)
            for (int z = 0; z < 4; z++) _mm512_storeu_ps(acc[h] + d0 + 16 * z, a[4 * h + z]);
    }
}

#endif

/* A prompt's T bf16 rows through attention, in place on their qkv rows [T][(H + 2G) D]: RoPE on q and k
 * (cos/sin [T][rot/2], one row per position), k and v into slots start..start+T-1 of the caches [G][slots][D],
 * then row i's heads attend over slots 0..start+i (causal in cache slots: a P-tuning prefix or an earlier
 * chunk before `start` is seen whole), o [T][H D]. Why not torch's SDPA: its CPU flash kernel without AMX
 * ran a 512-row ChatGLM3-6B layer in 27 ms on a Zen 5 (2 threads), 13% of the prompt; here 7 ms. One task per
 * (row, four heads of a kv head), through attend4_avx512 where the CPU has AVX-512 (else the decode step's
 * attend4_avx2), or per (row, head) for a group's heads left over. AVX2 or better, D a multiple of 8 (the
 * caller checks); returns -11 when its scratch cannot be allocated. */
int lvq_attend_rows(uint16_t *qkv, const float *cos, const float *sin, int64_t rot, int64_t H, int64_t G,
                    int64_t D, uint16_t *kc, uint16_t *vc, int64_t slots, int64_t start, int64_t T, uint16_t *o,
                    int nthreads) {
#ifdef LVQ_X86
    const int64_t half = rot / 2, W = (H + 2 * G) * D, per = H / G, quads = per / 4, n = quads + per % 4;
    const int64_t S1 = start + T;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
#endif
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < T; i++)
        rope_cache_row(qkv + i * W, 1, cos + i * half, sin + i * half, rot, H, G, D, kc, vc, slots, start + i);
    int fail = 0;
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t SP = (S1 + 31) / 32 * 32, KV = D * SP + S1 * D; /* floats per kv head in kv_float's tables */
    /* AVX-512: keys and values converted once per chunk (bounded: 16 MiB per kv head at 16K slots and D 128) */
    float *kvf = lvq_isa() >= ISA_VNNI && D % 64 == 0 && quads && SP <= 16384 ? (float *)malloc(sizeof(float) * G * KV)
                                                                              : NULL;
    if (kvf) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t g = 0; g < G; g++) kv_float(kc + g * slots * D, vc + g * slots * D, S1, D, kvf + g * KV, kvf + g * KV + D * SP);
    }
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc(sizeof(float) * 4 * (2 * D + SP)); /* per head: q, acc, scores */
        if (!buf) {
#pragma omp atomic write
            fail = 1;
        }
        /* rows' work grows with i: dynamic chunks keep the threads level */
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < T * G * n; task++) { /* per (row, kv head): four-head tasks, then single heads */
            if (!buf) continue;
            const int64_t i = task / (G * n), g = task / n % G, j = task % n;
            const int64_t h0 = g * per + (j < quads ? 4 * j : 4 * quads + (j - quads)), nh = j < quads ? 4 : 1;
            float *q[4], *acc[4], *sc[4];
            for (int64_t u = 0; u < nh; u++) {
                q[u] = buf + u * (2 * D + SP), acc[u] = q[u] + D, sc[u] = acc[u] + D;
                for (int64_t d = 0; d < D; d++) q[u][d] = bf2f(qkv[i * W + (h0 + u) * D + d]);
            }
            const uint16_t *kg = kc + g * slots * D, *vg = vc + g * slots * D;
            if (nh == 4 && kvf)
                attend4_avx512(q, kvf + g * KV, kvf + g * KV + D * SP, start + i + 1, D, scale, sc, acc);
            else if (nh == 4)
                attend4_avx2(q, kg, vg, start + i + 1, D, scale, sc, acc);
            else
                attend_head_avx2(q[0], kg, vg, start + i + 1, D, scale, sc[0], acc[0]);
            for (int64_t u = 0; u < nh; u++)
                for (int64_t d = 0; d < D; d++) o[i * H * D + (h0 + u) * D + d] = f2bf(acc[u][d]);
        }
        free(buf);
    }
    free(kvf);
    return fail ? -11 : 0;
#else
    return -1;
#endif
}

/* ---- One new token's attention over an INT8 KV cache (Int8KV in lowvram/models/glm.py) ----
 * The cache holds int8 codes [G][slots][D] with one float scale per (kv head, slot), half of bf16's bytes, for the
 * 128K/1M-context models. Torch multiplied the codes as float matrices (~25 ms a ChatGLM3-6B layer at 32K slots on
 * 2 threads, ~0.7 s a token); here each kv head's keys are read once for all the query heads that share it, in
 * chunks that split a long cache across threads (flash-decoding: each chunk's max, sum and weighted values, merged
 * at the end). */

#ifdef LVQ_X86
/* One head's D values (type t) to int8 as Int8KV.write rounds them: scale = max|x| / 127 (max|x| at least 1e-12),
 * codes = x / scale rounded half to even. */
static void quant_head_i8(const void *x, int t, int64_t off, int64_t D, int8_t *q, float *s) {
    float amax = 0.f;
    for (int64_t d = 0; d < D; d++) {
        float a = fabsf(ldf(x, t, off + d));
        amax = a > amax ? a : amax;
    }
    float sc = (amax > 1e-12f ? amax : 1e-12f) / 127.f;
    for (int64_t d = 0; d < D; d++) q[d] = (int8_t)nearbyintf(ldf(x, t, off + d) / sc);
    *s = sc;
}

/* The first nk of 16 lanes (key rows in a block), and lane j's offset j * stride (a gather's indices). */
static inline __mmask16 lanes16(int64_t nk) { return nk >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nk) - 1); }

VNNI static inline __m512i rows16(int64_t stride) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)stride));
}

/* Scores of NH query heads against nk <= 16 int8 key rows (D bytes apart): q[h] . k[j].
 * A gather brings four dims of all 16 keys at once (lane j = key j), so the products accumulate per key across
 * lanes with no horizontal sums; the query is broadcast. D a multiple of 4. The query is in int16 (qp: per head,
 * D/2 words, each two int16 as q16_pairs lays them out): vpdpwssd multiplies two dims of 16 keys by two of the
 * query and sums into int32 lanes, half the instructions of float FMAs and no conversion of the codes (a float
 * FMA chain was half a ChatGLM3-6B layer's attention at 32K slots). The int16 query is exact to 1/65534 of its
 * largest element; the sums are exact. Written scaled (by the query's scale qsc[h], the keys' ks[j] and `scale`) to
 * s[h * CH + j]. */
VNNI static inline __attribute__((always_inline)) void scores16_w16(const int32_t *qp, const float *qsc, int64_t D,
                                                                   const int NH, const int8_t *k, const float *ks,
                                                                   int64_t nk, float scale, float *s, int64_t CH) {
    __m512i a[16];
#pragma GCC unroll 16
    for (int h = 0; h < NH; h++) a[h] = _mm512_setzero_si512();
    const __mmask16 m = lanes16(nk);
    const __m512i idx = rows16(D);
    for (int64_t i = 0; i < 16 * D; i += 64) _mm_prefetch((const char *)(k + 16 * D + i), _MM_HINT_T0);
    for (int64_t d = 0; d < D; d += 4) {
        const __m512i x = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, k + d, 1);
        const __m512i e02 = _mm512_srai_epi16(_mm512_slli_epi16(x, 8), 8), e13 = _mm512_srai_epi16(x, 8);
#pragma GCC unroll 16
        for (int h = 0; h < NH; h++) {
            const int32_t *qh = qp + h * (D / 2) + d / 2;
            a[h] = _mm512_dpwssd_epi32(a[h], e02, _mm512_set1_epi32(qh[0]));
            a[h] = _mm512_dpwssd_epi32(a[h], e13, _mm512_set1_epi32(qh[1]));
        }
    }
    const __m512 kscale = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ks), _mm512_set1_ps(scale));
#pragma GCC unroll 16
    for (int h = 0; h < NH; h++)
        _mm512_mask_storeu_ps(s + h * CH, m, _mm512_mul_ps(_mm512_cvtepi32_ps(a[h]),
                                                           _mm512_mul_ps(_mm512_set1_ps(qsc[h]), kscale)));
}

#define LVQ_SCORES16(NH)                                                                                               \
    VNNI static void scores16_w16_##NH(const int32_t *qp, const float *qsc, int64_t D, const int8_t *k,             \
                                       const float *ks, int64_t nk, float scale, float *s, int64_t CH) {           \
        scores16_w16(qp, qsc, D, NH, k, ks, nk, scale, s, CH);                                                     \
    }
LVQ_SCORES16(16)
LVQ_SCORES16(4)
LVQ_SCORES16(1)

/* Scores of NH query heads (float, q[h] at q + h * D) against nk <= 16 bf16 key rows (D apart), scaled by `scale`
 * into s[h * CH + j]: as scores16_w16, a gather brings two dims of all 16 keys (lane j = key j), so no horizontal
 * sums; bf16 to float is a shift (even dim) or a mask (odd dim). D even. */
VNNI static inline __attribute__((always_inline)) void scores16_bf(const float *q, int64_t D, const int NH,
                                                                  const uint16_t *k, int64_t nk, float scale, float *s,
                                                                  int64_t CH) {
    __m512 a[16];
#pragma GCC unroll 16
    for (int h = 0; h < NH; h++) a[h] = _mm512_setzero_ps();
    const __mmask16 m = lanes16(nk);
    const __m512i idx = rows16(D);
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < 16 * D; i += 32) _mm_prefetch((const char *)(k + 16 * D + i), _MM_HINT_T0);
    for (int64_t d = 0; d < D; d += 2) {
        const __m512i x = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, k + d, 2);
        const __m512 k0 = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), k1 = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
#pragma GCC unroll 16
        for (int h = 0; h < NH; h++) {
            a[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h * D + d]), k0, a[h]);
            a[h] = _mm512_fmadd_ps(_mm512_set1_ps(q[h * D + d + 1]), k1, a[h]);
        }
    }
#pragma GCC unroll 16
    for (int h = 0; h < NH; h++) _mm512_mask_storeu_ps(s + h * CH, m, _mm512_mul_ps(a[h], _mm512_set1_ps(scale)));
}

#define LVQ_SCORES16_BF(NH)                                                                                            \
    VNNI static void scores16_bf_##NH(const float *q, int64_t D, const uint16_t *k, int64_t nk, float scale, float *s, \
                                      int64_t CH) {                                                                   \
        scores16_bf(q, D, NH, k, nk, scale, s, CH);                                                                   \
    }
LVQ_SCORES16_BF(16)
LVQ_SCORES16_BF(4)
LVQ_SCORES16_BF(1)

/* The int8 scores on AVX2, in float (no vpdpwssd there), scaled into s[h * CH + j] like scores16_w16: four heads
 * (nh <= 4) over nk keys, two keys at a time from contiguous rows, eight independent chains and one horizontal sum
 * per eight results, as attend4_avx2 does for bf16 (gathers were 1.7x slower on AVX2). D a multiple of 8. */
AVX2 static void scores4_i8_avx2(const float *q, int64_t D, int nh, const int8_t *k, const float *ks, int64_t nk,
                                 float scale, float *s, int64_t CH) {
    const float *qh[4];
    for (int h = 0; h < 4; h++) qh[h] = q + (h < nh ? h : 0) * D;
    for (int64_t j = 0; j < nk; j += 2) {
        const int8_t *k0 = k + j * D, *k1 = j + 1 < nk ? k0 + D : k0;
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 x0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k0 + d))));
            const __m256 x1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k1 + d))));
            for (int h = 0; h < 4; h++) {
                const __m256 qv = _mm256_loadu_ps(qh[h] + d);
                a[2 * h] = _mm256_fmadd_ps(qv, x0, a[2 * h]);
                a[2 * h + 1] = _mm256_fmadd_ps(qv, x1, a[2 * h + 1]);
            }
        }
        float r[8];
        _mm256_storeu_ps(r, hsum8x(a));
        for (int h = 0; h < nh; h++) {
            s[h * CH + j] = r[2 * h] * (ks[j] * scale);
            if (j + 1 < nk) s[h * CH + j + 1] = r[2 * h + 1] * (ks[j + 1] * scale);
        }
    }
}

VNNI static void bf_to_f32_avx512(const uint16_t *x, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(
                                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16)));
    for (; i < n; i++) y[i] = bf2f(x[i]);
}

/* acc[h][0..D) += sum_j p[h][j] vf[j][0..D) for nh <= 4 heads (p rows P apart, acc rows D apart) over n value rows
 * of float: sixteen accumulators in registers, D a multiple of 16. */
VNNI static void pv4_avx512(const float *p, int64_t P, int nh, const float *vf, int64_t n, int64_t D, float *acc) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int nv = D - d0 >= 64 ? 4 : (int)((D - d0) / 16);
        __m512 a[4][4];
        for (int h = 0; h < 4; h++)
            for (int z = 0; z < 4; z++)
                a[h][z] = h < nh && z < nv ? _mm512_loadu_ps(acc + h * D + d0 + 16 * z) : _mm512_setzero_ps();
        if (nh == 4 && nv == 4) {
            for (int64_t j = 0; j < n; j++) {
                const float *vr = vf + j * D + d0;
                const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                             v3 = _mm512_loadu_ps(vr + 48);
                for (int h = 0; h < 4; h++) {
                    const __m512 w = _mm512_set1_ps(p[h * P + j]);
                    a[h][0] = _mm512_fmadd_ps(w, v0, a[h][0]);
                    a[h][1] = _mm512_fmadd_ps(w, v1, a[h][1]);
                    a[h][2] = _mm512_fmadd_ps(w, v2, a[h][2]);
                    a[h][3] = _mm512_fmadd_ps(w, v3, a[h][3]);
                }
            }
        } else {
            for (int64_t j = 0; j < n; j++)
                for (int h = 0; h < nh; h++) {
                    const __m512 w = _mm512_set1_ps(p[h * P + j]);
                    for (int z = 0; z < nv; z++)
                        a[h][z] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vf + j * D + d0 + 16 * z), a[h][z]);
                }
        }
        for (int h = 0; h < nh; h++)
            for (int z = 0; z < nv; z++) _mm512_storeu_ps(acc + h * D + d0 + 16 * z, a[h][z]);
    }
}

/* pv4_avx512 on AVX2: four heads x sixteen dims, eight accumulators; D a multiple of 8. */
AVX2 static void pv4_avx2(const float *p, int64_t P, int nh, const float *vf, int64_t n, int64_t D, float *acc) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        const int nv = D - d0 >= 16 ? 2 : 1;
        __m256 a[4][2];
        for (int h = 0; h < 4; h++)
            for (int z = 0; z < 2; z++)
                a[h][z] = h < nh && z < nv ? _mm256_loadu_ps(acc + h * D + d0 + 8 * z) : _mm256_setzero_ps();
        if (nh == 4 && nv == 2) /* the common case with constant bounds, so the accumulators stay in registers */
            for (int64_t j = 0; j < n; j++) {
                const __m256 v0 = _mm256_loadu_ps(vf + j * D + d0), v1 = _mm256_loadu_ps(vf + j * D + d0 + 8);
                for (int h = 0; h < 4; h++) {
                    const __m256 w = _mm256_broadcast_ss(p + h * P + j);
                    a[h][0] = _mm256_fmadd_ps(w, v0, a[h][0]);
                    a[h][1] = _mm256_fmadd_ps(w, v1, a[h][1]);
                }
            }
        else
            for (int64_t j = 0; j < n; j++) {
                const __m256 v0 = _mm256_loadu_ps(vf + j * D + d0), v1 = nv == 2 ? _mm256_loadu_ps(vf + j * D + d0 + 8) : v0;
                for (int h = 0; h < nh; h++) {
                    const __m256 w = _mm256_broadcast_ss(p + h * P + j);
                    a[h][0] = _mm256_fmadd_ps(w, v0, a[h][0]);
                    a[h][1] = _mm256_fmadd_ps(w, v1, a[h][1]);
                }
            }
        for (int h = 0; h < nh; h++)
            for (int z = 0; z < nv; z++) _mm256_storeu_ps(acc + h * D + d0 + 8 * z, a[h][z]);
    }
}

/* n int8 codes to float. */
VNNI static void i8_to_f32_avx512(const int8_t *x, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(x + i)))));
    for (; i < n; i++) y[i] = (float)x[i];
}

AVX2 static void i8_to_f32_avx2(const int8_t *x, int64_t n, float *y) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(x + i)))));
    for (; i < n; i++) y[i] = (float)x[i];
}

/* One head's D float query values as int16 for scores16_w16 (D a multiple of 4): per four dims d..d+3 two words,
 * (q[d], q[d+2]) and (q[d+1], q[d+3]), the pairs the gathered key bytes split into; returns the scale. */
static float q16_pairs(const float *q, int64_t D, int32_t *qp) {
    float amax = 0.f;
    for (int64_t d = 0; d < D; d++) amax = fabsf(q[d]) > amax ? fabsf(q[d]) : amax;
    const float sc = amax > 0.f ? amax / 32767.f : 1.f;
    for (int64_t d = 0; d < D; d += 4) {
        int32_t v[4];
        for (int u = 0; u < 4; u++) v[u] = (int32_t)nearbyintf(q[d + u] / sc);
        qp[d / 2] = (int32_t)((uint32_t)(uint16_t)v[0] | (uint32_t)(uint16_t)v[2] << 16);
        qp[d / 2 + 1] = (int32_t)((uint32_t)(uint16_t)v[1] | (uint32_t)(uint16_t)v[3] << 16);
    }
    return sc;
}
#endif

/* Which loops the chunked attention below runs: 2 = AVX-512, 1 = AVX2, 0 = none (lvq_attend_one's own loops for
 * a bf16 cache; for an INT8 one the caller's torch code, faster than plain C loops there). */
static int chunk_path(int64_t D) {
#ifdef LVQ_X86
    if (lvq_isa() >= ISA_VNNI && D % 16 == 0) return 2;
    if (lvq_isa() >= ISA_AVX2 && D % 8 == 0) return 1;
#endif
    return 0;
}

#ifdef LVQ_X86
/* Keys [j0, j1) of one kv head for its `per` query heads (float, q[h] at q + h * D), over a cache of int8 codes
 * with per-slot scales ks/vs (kt 0) or of bf16 (kt 1, ks/vs NULL; AVX-512 only): the chunk's max score m[h], the sum of
 * exp(score - m) l[h] and acc[h][D] = sum_j exp(score_j - m) * vs[j] * v_j. Scratch: s (per x CH floats, CH >=
 * j1 - j0 rounded up to 16) and vf (64 x D floats); qp, qsc: the int16 query and its scales (int8, AVX-512). */
static void attend_chunk(int path, int kt, const float *q, const int32_t *qp, const float *qsc, int64_t per,
                         int64_t D, const void *kc, const float *ks, const void *vc, const float *vs, int64_t j0,
                         int64_t j1, float scale, int64_t CH, float *s, float *vf, float *m, float *l, float *acc) {
    const int64_t n = j1 - j0;
    /* scores, scaled by 1/sqrt(D) (and an int8 cache's key scales, the int16 query's scale) */
    if (path == 1) /* AVX2: int8 only, four heads over the whole chunk at a time */
        for (int64_t h = 0; h < per; h += 4)
            scores4_i8_avx2(q + h * D, D, per - h >= 4 ? 4 : (int)(per - h), (const int8_t *)kc + j0 * D, ks + j0, n,
                            scale, s + h * CH, CH);
    for (int64_t j = 0; path == 2 && j < n; j += 16) {
        const int64_t nk = n - j < 16 ? n - j : 16;
        const int8_t *k8 = (const int8_t *)kc + (j0 + j) * D;
        const uint16_t *k16 = (const uint16_t *)kc + (j0 + j) * D;
        for (int64_t h = 0; h < per;) {
            float *sh = s + h * CH + j;
            const int nh = per - h >= 16 ? 16 : per - h >= 4 ? 4 : 1;
            const int32_t *qh = kt ? NULL : qp + h * (D / 2);
            if (kt == 0 && nh == 16) scores16_w16_16(qh, qsc + h, D, k8, ks + j0 + j, nk, scale, sh, CH);
            else if (kt == 0 && nh == 4) scores16_w16_4(qh, qsc + h, D, k8, ks + j0 + j, nk, scale, sh, CH);
            else if (kt == 0) scores16_w16_1(qh, qsc + h, D, k8, ks + j0 + j, nk, scale, sh, CH);
            else if (nh == 16) scores16_bf_16(q + h * D, D, k16, nk, scale, sh, CH);
            else if (nh == 4) scores16_bf_4(q + h * D, D, k16, nk, scale, sh, CH);
            else scores16_bf_1(q + h * D, D, k16, nk, scale, sh, CH);
            h += nh;
        }
    }
    /* per head: max, exp, sum; weights times each value's scale */
    for (int64_t h = 0; h < per; h++) {
        m[h] = -INFINITY;
        l[h] = softmax_part_avx2(s + h * CH, n, vs ? vs + j0 : NULL, m + h);
        memset(acc + h * D, 0, sizeof(float) * D);
    }
    /* weighted values, 64 rows at a time converted to float once for all heads */
    for (int64_t b = 0; b < n; b += 64) {
        const int64_t nb = n - b < 64 ? n - b : 64;
        if (kt == 0 && path == 2) i8_to_f32_avx512((const int8_t *)vc + (j0 + b) * D, nb * D, vf);
        else if (kt == 0) i8_to_f32_avx2((const int8_t *)vc + (j0 + b) * D, nb * D, vf);
        else bf_to_f32_avx512((const uint16_t *)vc + (j0 + b) * D, nb * D, vf);
        for (int64_t h = 0; h < per; h += 4) {
            const int nh = per - h >= 4 ? 4 : (int)(per - h);
            if (path == 2) pv4_avx512(s + h * CH + b, CH, nh, vf, nb, D, acc + h * D);
            else pv4_avx2(s + h * CH + b, CH, nh, vf, nb, D, acc + h * D);
        }
    }
}

/* o[h] = softmax(q[h] . K[g]^T / sqrt(D)) V[g] over slots 0..S-1 for the H query heads of a (rotated) qkv row of
 * type t, g = h / (H/G), from caches [G][slots][D] of int8 codes with per-slot scales (kt 0) or of bf16 (kt 1,
 * path 2 only).
 * Each kv head's keys are read once for all the query heads that share it, in chunks that split a long cache
 * across threads (flash-decoding: each chunk's max, sum and weighted values, merged at the end); one head at a
 * time, as lvq_attend_one did before, ran ~4x below the machine's read rate at 32K slots. */
static int attend_cached(int path, int kt, const void *qkv, int t, int64_t H, int64_t G, int64_t D, const void *kc,
                         const float *ks, const void *vc, const float *vs, int64_t slots, int64_t S, void *o,
                         int nthreads) {
    const int64_t per = H / G;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t es = kt ? 2 : 1;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
#endif
    if (nthreads < 1 || S * H * D < (1 << 20)) nthreads = 1; /* short caches: not worth waking threads */
    /* chunks of at most 2048 keys (at most 256 of them), and about two per thread per kv head */
    int64_t nc = (S + 2047) / 2048, want = (2 * nthreads + G - 1) / G;
    if (nc < want) nc = want < (S + 255) / 256 ? want : (S + 255) / 256;
    if (nc > 256) nc = 256;
    if (nc < 1) nc = 1;
    const int64_t CH = ((S + nc - 1) / nc + 15) / 16 * 16;
    nc = (S + CH - 1) / CH;
    /* per (kv head, chunk): m, l and acc of its `per` heads; then the query as float, one head's merged output,
     * the query's int16 scales and pairs */
    float *part = (float *)malloc(sizeof(float) * (G * nc * per * (D + 2) + H * D + D + H + H * (D / 2)));
    if (!part) return -11;
    float *qf = part + G * nc * per * (D + 2), *qsc = qf + H * D + D;
    int32_t *qp = (int32_t *)(qsc + H);
    for (int64_t i = 0; i < H * D; i++) qf[i] = ldf(qkv, t, i);
    if (path == 2 && kt == 0)
        for (int64_t h = 0; h < H; h++) qsc[h] = q16_pairs(qf + h * D, D, qp + h * (D / 2));
    int fail = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc(sizeof(float) * (per * CH + 64 * D));
        if (!buf) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < G * nc; task++) {
            if (!buf) continue;
            const int64_t g = task / nc, c = task % nc, j1 = (c + 1) * CH < S ? (c + 1) * CH : S;
            float *pm = part + task * per * (D + 2), *pl = pm + per, *pa = pl + per;
            attend_chunk(path, kt, qf + g * per * D, qp + g * per * (D / 2), qsc + g * per, per, D,
                         (const char *)kc + g * slots * D * es, ks ? ks + g * slots : NULL,
                         (const char *)vc + g * slots * D * es, vs ? vs + g * slots : NULL, c * CH, j1, scale, CH, buf,
                         buf + per * CH, pm, pl, pa);
        }
        free(buf);
    }
    if (!fail)
        for (int64_t h = 0; h < H; h++) { /* merge the chunks: rescale each to the overall max */
            const int64_t g = h / per, u = h % per;
            float M = -INFINITY, L = 0.f, *acc = qf + H * D;
            for (int64_t c = 0; c < nc; c++) {
                const float mc = part[(g * nc + c) * per * (D + 2) + u];
                M = mc > M ? mc : M;
            }
            memset(acc, 0, sizeof(float) * D);
            for (int64_t c = 0; c < nc; c++) {
                const float *pm = part + (g * nc + c) * per * (D + 2), *pa = pm + 2 * per + u * D;
                const float w = expf(pm[u] - M);
                L += pm[per + u] * w;
                for (int64_t d = 0; d < D; d++) acc[d] += pa[d] * w;
            }
            for (int64_t d = 0; d < D; d++) stf(o, t, h * D + d, acc[d] / L);
        }
    free(part);
    return fail ? -11 : 0;
}
#endif

/* lvq_attend_one over an INT8 cache: RoPE on the token's q and k (in place in its qkv row, type t), its k and v
 * quantized into slot `slot` of kq/vq [G][slots][D] with their scales in ks/vs [G][slots] (as Int8KV.write), then
 * o[h] = softmax(q[h] . K[g]^T / sqrt(D)) V[g] over slots 0..slot with K, V the codes times their scales.
 * Returns -11 when its scratch cannot be allocated, -1 (having done nothing) without AVX2 or with D not a multiple
 * of 8. */
int lvq_attend_one_i8(void *qkv, int t, const float *cos, const float *sin, int64_t rot, int64_t H, int64_t G,
                      int64_t D, int8_t *kq, float *ks, int8_t *vq, float *vs, int64_t slots, int64_t slot, void *o,
                      int nthreads) {
    const int path = chunk_path(D);
    if (!path) return -1;
#ifdef LVQ_X86
    rope_row(qkv, t, cos, sin, rot, H, G, D);
    for (int64_t g = 0; g < G; g++) {
        quant_head_i8(qkv, t, (H + g) * D, D, kq + (g * slots + slot) * D, ks + g * slots + slot);
        quant_head_i8(qkv, t, (H + G + g) * D, D, vq + (g * slots + slot) * D, vs + g * slots + slot);
    }
    return attend_cached(path, 0, qkv, t, H, G, D, kq, ks, vq, vs, slots, slot + 1, o, nthreads);
#else
    return -1;
#endif
}

/* One quantized linear of a block, as lvq_decode_block takes it (all fields 8 bytes: no padding). */
typedef struct {
    int64_t K;
    const uint8_t *w;
    const uint16_t *scales;
    const uint8_t *zeros;
    int64_t N, bits, group;
    const float *bias;
} lvq_lin;

static int lin_bf16(const lvq_lin *l, const uint16_t *x, uint16_t *y, int nthreads) {
    return lvq_gemm(x, 1, 1, l->K, l->w, l->scales, l->zeros, l->N, (int)l->bits, (int)l->group, l->bias, y, 1, nthreads);
}

/* y = a + b in bf16, rounded as torch rounds a bf16 add (float sum, nearest even). */
static void add_bf16(const uint16_t *a, const uint16_t *b, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

/* One bf16 token through a whole pre-norm block (ChatGLM2/3, GLM-4; GLM-4-0414 with post norms pn1/pn2):
 * the same C steps as the block's separate calls (lvq_rmsnorm, lvq_gemm, lvq_attend_one, lvq_swiglu, a
 * bf16 residual add), in one call (Python reaches it through lvq_decode_blocks, one block or all): ~10
 * Python calls a block cost more than the attention itself on a 2-core CPU. Norm weights of type nt (0 float32,
 * 1 bf16); pn1/pn2 NULL without post norms; y may be x. ks/vs: the scales of an INT8 cache (kc, vc its codes:
 * lvq_attend_one_i8), or NULL for a bf16 one. */
static int lvq_decode_block(const void *x, void *y, const void *n1, const void *n2, const void *pn1,
                            const void *pn2, int nt, float eps, const lvq_lin *qkv, const lvq_lin *out,
                            const lvq_lin *up, const lvq_lin *down, const float *cos, const float *sin, int64_t rot,
                            int64_t H, int64_t G, int64_t D, void *kc, void *vc, float *ks, float *vs, int64_t slots,
                            int64_t slot, int nthreads, int athreads) {
    int64_t hid = qkv->K, ffn = down->K;
    if (out->N != hid || up->K != hid || down->N != hid || up->N != 2 * ffn || qkv->N != (H + 2 * G) * D ||
        out->K != H * D)
        return -10;
    uint16_t *h = malloc(sizeof(uint16_t) * (2 * hid + qkv->N + H * D + up->N + ffn)); /* all scratch, one block */
    if (!h) return -11;
    uint16_t *a = h + hid, *q = a + hid, *o = q + qkv->N, *u = o + H * D, *sw = u + up->N;
    int rc = 0;
    lvq_rmsnorm(x, 1, n1, nt, 1, hid, eps, h);
    if ((rc = lin_bf16(qkv, h, q, nthreads))) goto done;
    rc = ks ? lvq_attend_one_i8(q, 1, cos, sin, rot, H, G, D, kc, ks, vc, vs, slots, slot, o, athreads)
            : lvq_attend_one(q, 1, cos, sin, rot, H, G, D, kc, vc, slots, slot, o, athreads);
    if (rc) goto done;
    if ((rc = lin_bf16(out, o, a, nthreads))) goto done;
    if (pn1) lvq_rmsnorm(a, 1, pn1, nt, 1, hid, eps, a);
    add_bf16(x, a, y, hid);
    lvq_rmsnorm(y, 1, n2, nt, 1, hid, eps, h);
    if ((rc = lin_bf16(up, h, u, nthreads))) goto done;
    lvq_swiglu(u, 1, 1, ffn, sw, 1);
    if ((rc = lin_bf16(down, sw, a, nthreads))) goto done;
    if (pn2) lvq_rmsnorm(a, 1, pn2, nt, 1, hid, eps, a);
    add_bf16(y, a, y, hid);
done:
    free(h);
    return rc;
}

/* One block's fixed arguments of lvq_decode_block (all fields 8 bytes: no padding). */
typedef struct {
    const void *n1, *n2, *pn1, *pn2;
    int64_t nt;
    double eps;
    const lvq_lin *qkv, *out, *up, *down;
    int64_t nthreads;
} lvq_block;

/* One token through n blocks, layer i with its caches kc[i], vc[i] (bf16; or int8 codes with their scales in
 * ks[i], vs[i], where ks is not NULL): lvq_decode_block per block, in one call; attention on athreads threads,
 * or (athreads < 1) on each block's own. Between calls from Python a 2-core CPU spent ~300 us per block: the
 * interpreter's data had to come back from DRAM after every block had streamed ~100 MB of weights through the
 * caches (~8 ms a token). */
int lvq_decode_blocks(const void *x, void *y, const lvq_block *b, int64_t n, void *const *kc, void *const *vc,
                      float *const *ks, float *const *vs, const float *cos, const float *sin, int64_t rot, int64_t H,
                      int64_t G, int64_t D, int64_t slots, int64_t slot, int athreads) {
    for (int64_t i = 0; i < n; i++) {
        int rc = lvq_decode_block(i ? y : x, y, b[i].n1, b[i].n2, b[i].pn1, b[i].pn2, (int)b[i].nt, (float)b[i].eps,
                                  b[i].qkv, b[i].out, b[i].up, b[i].down, cos, sin, rot, H, G, D, kc[i], vc[i],
                                  ks ? ks[i] : NULL, vs ? vs[i] : NULL, slots, slot, (int)b[i].nthreads,
                                  athreads > 0 ? athreads : (int)b[i].nthreads);
        if (rc) return rc;
    }
    return 0;
}

/* An importable module, so that Python finds this library the usual way; the functions above are
 * called through ctypes, which releases the GIL for their duration. */
static struct PyModuleDef lvq_module = {PyModuleDef_HEAD_INIT, "_lvq", "lowvram native CPU kernels", -1, NULL};

PyMODINIT_FUNC PyInit__lvq(void) { return PyModule_Create(&lvq_module); }
