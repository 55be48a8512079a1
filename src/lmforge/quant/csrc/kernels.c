/* Matrix-vector products straight from GGUF block-quantized weights (AVX2 + FMA, and AVX-512 / VNNI where
 * compiled for them; OpenMP).
 *
 * Decoding a token reads every weight once, so on CPUs it is bound by memory bandwidth; reading the
 * 4- to 8-bit codes instead of fp32 weights is what makes it fast. Codes are decoded in registers and
 * multiplied with the activations (int16 per group of 32 by default, or fp32), so results match the
 * dequantized weights up to that rounding. Groups are 32 weights along K with one scale (Q6 codes: two)
 * and, for Q4 and Q5 codes, one offset each:
 *
 *   y[m, n] = sum_g  scale[n, g] * sum_j code(n, 32g + j) * x[m, 32g + j]  +  zero[n, g] * sum_j x[m, 32g + j]
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 16  /* must match quant.py */

/* The products' path, by the instruction set this library is compiled for (kernels.py builds one library
 * per feature set): with AVX-512 (F, BW, VL), two groups at a time in 512-bit registers, the int16 dot
 * products by VNNI's vpdpwssd where present; otherwise 256-bit, by AVX-VNNI's vpdpwssd where present.
 * Every path forms the same int32 lane sums (integer sums are exact) and then the same float operations
 * in the same order, so results are bit-identical across paths: a row's result never depends on the
 * machine's instruction set, as it never depends on its batch. `dot_path` names the path. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAIRS512 1
#else
#define PAIRS512 0
#endif

const char *dot_path(void) {
#if PAIRS512 && defined(__AVX512VNNI__)
    return "AVX-512 VNNI";
#elif PAIRS512
    return "AVX-512";
#elif defined(__AVXVNNI__)
    return "AVX-VNNI";
#else
    return "AVX2";
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* -- 16-bit activations -------------------------------------------------------------------------------
 * The same products with each group of 32 activations rounded to int16 (scale = max|x| / 32767), so
 * integer multiply-adds (vpmaddwd) do 16 products an instruction instead of per-element float
 * conversions. Relative rounding is at most 2^-16 of the group's largest activation: about 256 times
 * finer than the 8-bit activations llama.cpp uses. */
/* Where group g's int16 activations start in their row, and the offset of its second half of 16. With
 * PAIRS512, each pair of groups (g, g + 1) is stored as [g 0..15, g+1 0..15, g 16..31, g+1 16..31], so that
 * one 512-bit load holds the halves that one 512-bit multiply-add pairs with both groups' codes; an odd last
 * group stays in order. */
static inline int64_t xq_at(int64_t g, int64_t G) {
    return PAIRS512 && g < (G & ~(int64_t)1) ? (g & ~(int64_t)1) * 32 + (g & 1) * 16 : g * 32;
}
static inline int64_t xq_hi(int64_t g, int64_t G) { return PAIRS512 && g < (G & ~(int64_t)1) ? 32 : 16; }

static void quantize16(const float *x, int16_t *xq, float *dx, float *xsum, int64_t M, int64_t K, int threads) {
    const int64_t G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.f);
    /* Vectorized (cvtps rounds to nearest even, as lrintf does) and split across threads when large:
     * at a batch of 16 rows this runs before every product and would otherwise be serial. */
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K >= 8192)
    for (int64_t mg = 0; mg < M * G; mg++) {
        const float *p = x + mg * 32;
        __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int c = 0; c < 4; c++) {
            v[c] = _mm256_loadu_ps(p + 8 * c);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[c]));
            sum = _mm256_add_ps(sum, v[c]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4), d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
        __m256 s = _mm256_set1_ps(inv);
        const int64_t g = mg % G;
        int16_t *dst = xq + (mg / G) * K + xq_at(g, G);
        for (int c = 0; c < 4; c += 2) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], s)), b = _mm256_cvtps_epi32(_mm256_mul_ps(v[c + 1], s));
            /* packs interleaves 128-bit lanes; the permute puts the 16 values back in order */
            __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(dst + (c ? xq_hi(g, G) : 0)), q);
        }
        dx[mg] = d;
        xsum[mg] = hsum(sum);
    }
}

/* A product's activations: int16 with a scale per group of 32 (xq, dx), or fp32 (x; xq NULL), and each
 * group's sum (for the zero points). With PAIRS512, fp32 ones also as xf: each pair of groups (g, g + 1)
 * in 8-float chunks [g 0..7, g+1 0..7, g 8..15, g+1 8..15, ...], the chunks one 512-bit register takes. */
typedef struct { int16_t *xq; float *dx, *xsum; const float *x; float *xf; } Acts;

static Acts acts(const float *x, int64_t M, int64_t K, const int a16, int threads) {
    const int64_t G = K / 32;
    Acts a = {NULL, NULL, malloc(sizeof(float) * M * G), x, NULL};
    if (a16) {
        a.xq = malloc(sizeof(int16_t) * M * K);
        a.dx = malloc(sizeof(float) * M * G);
        quantize16(x, a.xq, a.dx, a.xsum, M, K, threads);
        return a;
    }
    for (int64_t mg = 0; mg < M * G; mg++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[mg * 32 + j];
        a.xsum[mg] = s;
    }
    if (PAIRS512) {
        a.xf = malloc(sizeof(float) * M * K);
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < (G & ~(int64_t)1); g++)
                for (int c = 0; c < 4; c++)
                    memcpy(a.xf + m * K + (g & ~(int64_t)1) * 32 + c * 16 + (g & 1) * 8, x + m * K + g * 32 + c * 8,
                           sizeof(float) * 8);
    }
    return a;
}

static void acts_free(Acts a) { free(a.xq); free(a.dx); free(a.xsum); free(a.xf); }

/* -- code kinds ---------------------------------------------------------------------------------------
 * How a group of 32 weights is stored (quant/packed.py PackedWeight; the numbers are kernels.py KINDS):
 *   Q8: 32 signed bytes;                                       w = scale * q
 *   Q4: 16 bytes, GGML nibble order (byte j: element j low, j + 16 high);   w = scale * q + zero
 *   Q5: those 16 bytes, then 4 bytes of fifth bits (byte j, bit i: element j + 4i); w = scale * q + zero
 *   Q6: those 16 bytes, then 8 bytes of two top bits (byte j, bits 2i..2i+1: element j + 8i), and one
 *       scale per 16 elements (two a group);                   w = scale[j / 16] * (q - 32)
 * GGUF's Q4_K, Q5_K and Q6_K blocks re-lay into Q4, Q5 and Q6 without changing a weight. */
enum { KIND_Q8 = 0, KIND_Q4 = 1, KIND_Q5 = 2, KIND_Q6 = 3 };

static inline int64_t group_bytes(const int kind) {
    return kind == KIND_Q8 ? 32 : kind == KIND_Q4 ? 16 : kind == KIND_Q5 ? 20 : 24;
}

/* A group's 32 codes as two vectors of 16 bytes (elements 0..15 and 16..31): signed for Q8 and Q6
 * (whose -32 is applied here), unsigned for Q4 and Q5. */
static inline int is_signed(const int kind) { return kind == KIND_Q8 || kind == KIND_Q6; }

static inline __attribute__((always_inline)) void unpack(const void *row, int64_t g, const int kind, __m128i *lo,
                                                         __m128i *hi) {
    if (kind == KIND_Q8) {
        const int8_t *b = (const int8_t *)row + g * 32;
        *lo = _mm_loadu_si128((const __m128i *)b);
        *hi = _mm_loadu_si128((const __m128i *)(b + 16));
        return;
    }
    const uint8_t *b = (const uint8_t *)row + g * group_bytes(kind);
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadu_si128((const __m128i *)b);
    __m128i l = _mm_and_si128(raw, mask), h = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    if (kind == KIND_Q5) {  /* the 4 bytes of fifth bits in every 32-bit lane, each lane shifted so that */
        int32_t bits;       /* its 4 elements' bits land on bit 4 of their bytes */
        memcpy(&bits, b + 16, 4);
        const __m128i t = _mm_set1_epi32(bits), m = _mm_set1_epi8(0x10);
        l = _mm_or_si128(l, _mm_and_si128(_mm_sllv_epi32(t, _mm_setr_epi32(4, 3, 2, 1)), m));
        h = _mm_or_si128(h, _mm_and_si128(_mm_srlv_epi32(t, _mm_setr_epi32(0, 1, 2, 3)), m));
    } else if (kind == KIND_Q6) {  /* the 8 bytes of top bits in both halves, each half shifted so that */
        int64_t top;               /* its elements' two bits land on bits 4..5 of their bytes */
        memcpy(&top, b + 16, 8);
        const __m128i t = _mm_set1_epi64x(top), m = _mm_set1_epi8(0x30), off = _mm_set1_epi8(32);
        l = _mm_sub_epi8(_mm_or_si128(l, _mm_and_si128(_mm_sllv_epi64(t, _mm_set_epi64x(2, 4)), m)), off);
        h = _mm_sub_epi8(_mm_or_si128(h, _mm_and_si128(_mm_srlv_epi64(t, _mm_set_epi64x(2, 0)), m)), off);
    }
    *lo = l;
    *hi = h;
}

/* A group's codes widened for int16 activations (2 x 16 int16) or for fp32 ones (4 x 8 floats). */
static inline __attribute__((always_inline)) void widen16(__m128i l, __m128i h, const int kind, __m256i *lo,
                                                          __m256i *hi) {
    *lo = is_signed(kind) ? _mm256_cvtepi8_epi16(l) : _mm256_cvtepu8_epi16(l);
    *hi = is_signed(kind) ? _mm256_cvtepi8_epi16(h) : _mm256_cvtepu8_epi16(h);
}

static inline __attribute__((always_inline)) void widen32(__m128i l, __m128i h, const int kind, __m256 *w) {
    __m128i v[4] = {l, _mm_srli_si128(l, 8), h, _mm_srli_si128(h, 8)};
    for (int c = 0; c < 4; c++)
        w[c] = _mm256_cvtepi32_ps(is_signed(kind) ? _mm256_cvtepi8_epi32(v[c]) : _mm256_cvtepu8_epi32(v[c]));
}

static inline int has_zero(const int kind) { return kind == KIND_Q4 || kind == KIND_Q5; }
static inline int64_t scales_per_group(const int kind) { return kind == KIND_Q6 ? 2 : 1; }

/* acc += a group's products with one activation row, times the group's scale(s) (sc: the weight row's
 * scales; Q6 codes have one per 16 elements) and, for int16 activations, the activations' scale d. */
static inline __attribute__((always_inline)) __m256 acc16(__m256i lo, __m256i hi, const int16_t *xp, const float *sc,
                                                         int64_t g, float d, const int kind, __m256 acc) {
    __m256i s0 = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xp));
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xp + 16));
    if (kind != KIND_Q6) {  /* lane i: products 2i, 2i + 1, 16 + 2i and 17 + 2i, summed exactly */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        const __m256i s = _mm256_dpwssd_epi32(s0, hi, x1);
#elif defined(__AVXVNNI__)
        const __m256i s = _mm256_dpwssd_avx_epi32(s0, hi, x1);
#else
        const __m256i s = _mm256_add_epi32(s0, _mm256_madd_epi16(hi, x1));
#endif
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(sc[g] * d), acc);
    }
    __m256i s1 = _mm256_madd_epi16(hi, x1);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_set1_ps(sc[2 * g] * d), acc);  /* Q6: a scale per 16 */
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(sc[2 * g + 1] * d), acc);
}

static inline __attribute__((always_inline)) __m256 acc32(const __m256 *w, const float *xp, const float *sc, int64_t g,
                                                         const int kind, __m256 acc) {
    __m256 p0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp + 8), _mm256_mul_ps(w[0], _mm256_loadu_ps(xp)));
    __m256 p1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp + 24), _mm256_mul_ps(w[2], _mm256_loadu_ps(xp + 16)));
    if (kind != KIND_Q6) return _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(sc[g]), acc);
    acc = _mm256_fmadd_ps(p0, _mm256_set1_ps(sc[2 * g]), acc);
    return _mm256_fmadd_ps(p1, _mm256_set1_ps(sc[2 * g + 1]), acc);
}

#if PAIRS512
/* Two groups' codes (g and g + 1) as two vectors of 32 bytes: [g 0..15 | g+1 0..15] and [g 16..31 | g+1
 * 16..31], the same bytes `unpack` gives for each group, decoded side by side in 256-bit registers. */
static inline __attribute__((always_inline)) void unpack2(const void *row, int64_t g, const int kind, __m256i *lo,
                                                          __m256i *hi) {
    const int64_t gb = group_bytes(kind);
    const uint8_t *b = (const uint8_t *)row + g * gb;
#define PAIR(p, q) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p))), \
                                           _mm_loadu_si128((const __m128i *)(q)), 1)
    if (kind == KIND_Q8) {
        *lo = PAIR(b, b + 32);
        *hi = PAIR(b + 16, b + 48);
        return;
    }
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i raw = kind == KIND_Q4 ? _mm256_loadu_si256((const __m256i *)b) : PAIR(b, b + gb);
#undef PAIR
    __m256i l = _mm256_and_si256(raw, mask), h = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    if (kind == KIND_Q5) {  /* as in unpack, each 128-bit half with its own group's fifth bits */
        int32_t b0, b1;
        memcpy(&b0, b + 16, 4);
        memcpy(&b1, b + gb + 16, 4);
        const __m256i t = _mm256_setr_epi32(b0, b0, b0, b0, b1, b1, b1, b1), m = _mm256_set1_epi8(0x10);
        l = _mm256_or_si256(l, _mm256_and_si256(_mm256_sllv_epi32(t, _mm256_setr_epi32(4, 3, 2, 1, 4, 3, 2, 1)), m));
        h = _mm256_or_si256(h, _mm256_and_si256(_mm256_srlv_epi32(t, _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3)), m));
    } else if (kind == KIND_Q6) {
        int64_t t0, t1;
        memcpy(&t0, b + 16, 8);
        memcpy(&t1, b + gb + 16, 8);
        const __m256i t = _mm256_setr_epi64x(t0, t0, t1, t1), m = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
        l = _mm256_sub_epi8(_mm256_or_si256(l, _mm256_and_si256(_mm256_sllv_epi64(t, _mm256_setr_epi64x(4, 2, 4, 2)), m)), off);
        h = _mm256_sub_epi8(_mm256_or_si256(h, _mm256_and_si256(_mm256_srlv_epi64(t, _mm256_setr_epi64x(0, 2, 0, 2)), m)), off);
    }
    *lo = l;
    *hi = h;
}

/* [p[i] x 8 | p[j] x 8] (i, j < n; p[0..n-1] is all that is read): two scales side by side, for the groups
 * in the two halves of a 512-bit register. */
static inline __attribute__((always_inline)) __m512 pair_ps(const float *p, const int n, const int i, const int j) {
    const __m512i idx = _mm512_setr_epi32(i, i, i, i, i, i, i, i, j, j, j, j, j, j, j, j);
    const __m128 v = n == 2 ? _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)) : _mm_loadu_ps(p);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

/* The tile's products over pairs of groups, up to the last even group: acc[i]'s low half is what tile's
 * acc0[i] is after them, its high half acc1[i], every lane computed by the operations acc16 (a16) or acc32
 * apply to it. */
static inline __attribute__((always_inline)) void pairs512(const void *row, const float *sc, Acts a, __m256 *acc0,
                                                           __m256 *acc1, int64_t m0, int64_t K, const int kind,
                                                           const int a16, const int T) {
    const int64_t G = K / 32;
    __m512 acc[4];
    for (int i = 0; i < T; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g + 2 <= G; g += 2) {
        __m256i l, h;
        unpack2(row, g, kind, &l, &h);
        __m512 s0, s1;  /* the weight scales: [g | g+1], and for Q6 [g, first 16 | g+1, first 16] and second 16s */
        if (kind == KIND_Q6) {
            s0 = pair_ps(sc + 2 * g, 4, 0, 2);
            s1 = pair_ps(sc + 2 * g, 4, 1, 3);
        } else {
            s0 = s1 = pair_ps(sc + g, 2, 0, 1);
        }
        if (!a16) {  /* w[c]: chunk c (8 codes) of both groups, as floats */
            const __m128i l0 = _mm256_castsi256_si128(l), l1 = _mm256_extracti128_si256(l, 1);
            const __m128i h0 = _mm256_castsi256_si128(h), h1 = _mm256_extracti128_si256(h, 1);
            const __m128i b[4] = {_mm_unpacklo_epi64(l0, l1), _mm_unpackhi_epi64(l0, l1), _mm_unpacklo_epi64(h0, h1),
                                  _mm_unpackhi_epi64(h0, h1)};
            __m512 w[4];
            for (int c = 0; c < 4; c++)
                w[c] = _mm512_cvtepi32_ps(is_signed(kind) ? _mm512_cvtepi8_epi32(b[c]) : _mm512_cvtepu8_epi32(b[c]));
            for (int i = 0; i < T; i++) {
                const float *xp = a.xf + (m0 + i) * K + g * 32;
                const __m512 p0 = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xp + 16), _mm512_mul_ps(w[0], _mm512_loadu_ps(xp)));
                const __m512 p1 = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xp + 48), _mm512_mul_ps(w[2], _mm512_loadu_ps(xp + 32)));
                if (kind != KIND_Q6) {
                    acc[i] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s0, acc[i]);
                } else {
                    acc[i] = _mm512_fmadd_ps(p0, s0, acc[i]);
                    acc[i] = _mm512_fmadd_ps(p1, s1, acc[i]);
                }
            }
            continue;
        }
        const __m512i lo = is_signed(kind) ? _mm512_cvtepi8_epi16(l) : _mm512_cvtepu8_epi16(l);
        const __m512i hi = is_signed(kind) ? _mm512_cvtepi8_epi16(h) : _mm512_cvtepu8_epi16(h);
        for (int i = 0; i < T; i++) {
            const int16_t *xp = a.xq + (m0 + i) * K + g * 32;
            const __m512i x0 = _mm512_loadu_si512(xp), x1 = _mm512_loadu_si512(xp + 32);
            /* scale x d per lane: the same products as tile's scalar sc[g] * d */
            const __m512 d = pair_ps(a.dx + (m0 + i) * G + g, 2, 0, 1);
            if (kind != KIND_Q6) {
#ifdef __AVX512VNNI__
                const __m512i s = _mm512_dpwssd_epi32(_mm512_madd_epi16(lo, x0), hi, x1);
#else
                const __m512i s = _mm512_add_epi32(_mm512_madd_epi16(lo, x0), _mm512_madd_epi16(hi, x1));
#endif
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(s0, d), acc[i]);
            } else {
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(lo, x0)), _mm512_mul_ps(s0, d), acc[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(hi, x1)), _mm512_mul_ps(s1, d), acc[i]);
            }
        }
    }
    for (int i = 0; i < T; i++) {
        acc0[i] = _mm512_castps512_ps256(acc[i]);
        acc1[i] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1));
    }
}
#endif

/* One weight row against a tile of T activation rows: each group's codes are decoded once for the whole
 * tile (T, kind and a16 are constants at every call, so the row loop unrolls and the accumulators stay in
 * registers). Every row goes through exactly the arithmetic of a one-row product (two accumulators
 * alternating groups, then for codes with zero points the term sum_g zero[g] * xsum[m, g]), so a row's
 * result never depends on its batch. */
static inline __attribute__((always_inline)) void tile(const void *row, const float *sc, const float *ze, Acts a,
                                                       float *y, int64_t m0, int64_t ldy, int64_t n, int64_t K,
                                                       const int kind, const int a16, const int T) {
    const int64_t G = K / 32;
    __m256 acc0[4], acc1[4];
    for (int i = 0; i < T; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    int64_t g = 0;
    __m128i l0, h0, l1, h1;
    if (a16) {
        __m256i lo0, hi0, lo1, hi1;
#if PAIRS512
        pairs512(row, sc, a, acc0, acc1, m0, K, kind, 1, T);
        g = G & ~(int64_t)1;
#endif
        for (; g + 2 <= G; g += 2) {
            unpack(row, g, kind, &l0, &h0);
            unpack(row, g + 1, kind, &l1, &h1);
            widen16(l0, h0, kind, &lo0, &hi0);
            widen16(l1, h1, kind, &lo1, &hi1);
            for (int i = 0; i < T; i++) {
                const int16_t *xp = a.xq + (m0 + i) * K + g * 32;
                const float *d = a.dx + (m0 + i) * G + g;
                acc0[i] = acc16(lo0, hi0, xp, sc, g, d[0], kind, acc0[i]);
                acc1[i] = acc16(lo1, hi1, xp + 32, sc, g + 1, d[1], kind, acc1[i]);
            }
        }
        if (g < G) {
            unpack(row, g, kind, &l0, &h0);
            widen16(l0, h0, kind, &lo0, &hi0);
            for (int i = 0; i < T; i++)
                acc0[i] = acc16(lo0, hi0, a.xq + (m0 + i) * K + g * 32, sc, g, a.dx[(m0 + i) * G + g], kind, acc0[i]);
        }
    } else {
        __m256 w0[4], w1[4];
#if PAIRS512
        pairs512(row, sc, a, acc0, acc1, m0, K, kind, 0, T);
        g = G & ~(int64_t)1;
#endif
        for (; g + 2 <= G; g += 2) {
            unpack(row, g, kind, &l0, &h0);
            unpack(row, g + 1, kind, &l1, &h1);
            widen32(l0, h0, kind, w0);
            widen32(l1, h1, kind, w1);
            for (int i = 0; i < T; i++) {
                const float *xp = a.x + (m0 + i) * K + g * 32;
                acc0[i] = acc32(w0, xp, sc, g, kind, acc0[i]);
                acc1[i] = acc32(w1, xp + 32, sc, g + 1, kind, acc1[i]);
            }
        }
        if (g < G) {
            unpack(row, g, kind, &l0, &h0);
            widen32(l0, h0, kind, w0);
            for (int i = 0; i < T; i++) acc0[i] = acc32(w0, a.x + (m0 + i) * K + g * 32, sc, g, kind, acc0[i]);
        }
    }
    for (int i = 0; i < T; i++) {
        float z = 0.f;
        if (has_zero(kind)) {  /* vectorized: as a scalar chain of dependent adds this cost a sixth of the product */
            const float *xs = a.xsum + (m0 + i) * G;
            __m256 zz = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 8 <= G; j += 8) zz = _mm256_fmadd_ps(_mm256_loadu_ps(ze + j), _mm256_loadu_ps(xs + j), zz);
            z = hsum(zz);
            for (; j < G; j++) z += ze[j] * xs[j];
        }
        y[(m0 + i) * ldy + n] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + z;
    }
}

/* One weight row against every activation row, in tiles of 4, 2, 1. */
static inline __attribute__((always_inline)) void row_product(const uint8_t *row, const float *sc, const float *ze,
                                                              Acts a, float *y, int64_t M, int64_t ldy, int64_t n,
                                                              int64_t K, const int kind, const int a16) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile(row, sc, ze, a, y, m, ldy, n, K, kind, a16, 4);
    if (m + 2 <= M) { tile(row, sc, ze, a, y, m, ldy, n, K, kind, a16, 2); m += 2; }
    if (m < M) tile(row, sc, ze, a, y, m, ldy, n, K, kind, a16, 1);
}

/* y [M, N] (row stride ldy) = x [M, K] @ w.T for codes of any kind, int16 (a16) or fp32 activations. The
 * switch sits inside the parallel loop so each case is compiled with constant kind and a16 (OpenMP
 * outlines the loop body before inlining could make them constants). */
static void gemv(const float *x, const void *codes, const float *scale, const float *zero, float *y, int64_t M,
                 int64_t N, int64_t ldy, int64_t K, int threads, int kind, int a16) {
    const int64_t G = K / 32, row_bytes = G * group_bytes(kind), spg = scales_per_group(kind);
    Acts a = acts(x, M, K, a16, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = (const uint8_t *)codes + n * row_bytes;
        const float *sc = scale + n * G * spg, *ze = has_zero(kind) ? zero + n * G : NULL;
#define ROW(KIND, A16) row_product(row, sc, ze, a, y, M, ldy, n, K, KIND, A16); break
        switch (kind * 2 + a16) {
        case KIND_Q4 * 2 + 1: ROW(KIND_Q4, 1);
        case KIND_Q5 * 2 + 1: ROW(KIND_Q5, 1);
        case KIND_Q6 * 2 + 1: ROW(KIND_Q6, 1);
        case KIND_Q8 * 2 + 1: ROW(KIND_Q8, 1);
        case KIND_Q4 * 2: ROW(KIND_Q4, 0);
        case KIND_Q5 * 2: ROW(KIND_Q5, 0);
        case KIND_Q6 * 2: ROW(KIND_Q6, 0);
        default: ROW(KIND_Q8, 0);
        }
#undef ROW
    }
    acts_free(a);
}

/* The exported products: "16" ones round activations to int16, the others keep them fp32. */
#define PRODUCTS(name, KIND)                                                                                      \
    void name##_gemv16(const float *x, const void *codes, const float *scale, const float *zero, float *y,      \
                       int64_t M, int64_t N, int64_t K, int threads) {                                          \
        gemv(x, codes, scale, zero, y, M, N, N, K, threads, KIND, 1);                                               \
    }                                                                                                             \
    void name##_gemv(const float *x, const void *codes, const float *scale, const float *zero, float *y,        \
                     int64_t M, int64_t N, int64_t K, int threads) {                                            \
        gemv(x, codes, scale, zero, y, M, N, N, K, threads, KIND, 0);                                               \
    }
/* Q4 and Q5 products take zero points; Q8 and Q6 ones do not (their zero argument is left out). */
PRODUCTS(q4, KIND_Q4)
PRODUCTS(q5, KIND_Q5)

#define PRODUCTS_NO_ZERO(name, KIND)                                                                              \
    void name##_gemv16(const float *x, const void *codes, const float *scale, float *y, int64_t M, int64_t N,   \
                       int64_t K, int threads) {                                                                 \
        gemv(x, codes, scale, NULL, y, M, N, N, K, threads, KIND, 1);                                               \
    }                                                                                                             \
    void name##_gemv(const float *x, const void *codes, const float *scale, float *y, int64_t M, int64_t N,     \
                     int64_t K, int threads) {                                                                   \
        gemv(x, codes, scale, NULL, y, M, N, N, K, threads, KIND, 0);                                               \
    }
PRODUCTS_NO_ZERO(q8, KIND_Q8)
PRODUCTS_NO_ZERO(q6, KIND_Q6)

#include "decode.h"
