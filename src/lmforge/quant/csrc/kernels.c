/* Matrix-vector products straight from GGUF block-quantized weights (AVX2 + FMA, OpenMP).
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
static void quantize16(const float *x, int16_t *xq, float *dx, float *xsum, int64_t M, int64_t K) {
    const int64_t G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.f);
    /* Vectorized (cvtps rounds to nearest even, as lrintf does) and split across threads when large:
     * at a batch of 16 rows this runs before every product and would otherwise be serial. */
#pragma omp parallel for schedule(static) if (M * K >= 8192)
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
        for (int c = 0; c < 4; c += 2) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], s)), b = _mm256_cvtps_epi32(_mm256_mul_ps(v[c + 1], s));
            /* packs interleaves 128-bit lanes; the permute puts the 16 values back in order */
            __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + mg * 32 + 8 * c), q);
        }
        dx[mg] = d;
        xsum[mg] = hsum(sum);
    }
}

/* A product's activations: int16 with a scale per group of 32 (xq, dx), or fp32 (x; xq NULL), and each
 * group's sum (for the zero points). */
typedef struct { int16_t *xq; float *dx, *xsum; const float *x; } Acts;

static Acts acts(const float *x, int64_t M, int64_t K, const int a16) {
    const int64_t G = K / 32;
    Acts a = {NULL, NULL, malloc(sizeof(float) * M * G), x};
    if (a16) {
        a.xq = malloc(sizeof(int16_t) * M * K);
        a.dx = malloc(sizeof(float) * M * G);
        quantize16(x, a.xq, a.dx, a.xsum, M, K);
        return a;
    }
    for (int64_t mg = 0; mg < M * G; mg++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += x[mg * 32 + j];
        a.xsum[mg] = s;
    }
    return a;
}

static void acts_free(Acts a) { free(a.xq); free(a.dx); free(a.xsum); }

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
    __m256i s1 = _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xp + 16)));
    if (kind != KIND_Q6)
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), _mm256_set1_ps(sc[g] * d), acc);
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
    Acts a = acts(x, M, K, a16);
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

/* -- small fused ops for the decode step -----------------------------------------------------------------
 * Each replaces several PyTorch ops whose dispatch costs more than their arithmetic at one token. */
void rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *p = x + r * dim;
        float ss = 0.f;
        for (int64_t j = 0; j < dim; j++) ss += p[j] * p[j];
        float inv = 1.f / sqrtf(ss / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) y[r * dim + j] = w[j] * (p[j] * inv);
    }
}

/* exp(x) for 8 floats (Cephes' polynomial, within 2 ulp of expf): x = n ln2 + r, exp(r) by a polynomial,
 * 2^n through the exponent bits. The clamp keeps 2^n a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* h: [rows, 2 * ffn] = gate | up; y: [rows, ffn] = silu(gate) * up. Vectorized and, for a batch of rows,
 * threaded: with one expf per element it was a twentieth of a 16-row decode step. */
void swiglu(const float *h, float *y, int64_t rows, int64_t ffn) {
#pragma omp parallel for schedule(static) if (rows * ffn >= 16384)
    for (int64_t r = 0; r < rows; r++) {
        const float *gp = h + r * 2 * ffn, *up = gp + ffn;
        float *yp = y + r * ffn;
        int64_t j = 0;
        for (; j + 8 <= ffn; j += 8) {
            __m256 g = _mm256_loadu_ps(gp + j);
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(yp + j, _mm256_mul_ps(s, _mm256_loadu_ps(up + j)));
        }
        for (; j < ffn; j++) yp[j] = gp[j] / (1.f + expf(-gp[j])) * up[j];
    }
}

/* Rotary embedding in place on a fresh qkv projection: x [rows, heads, hd], rotating the first n_rot
 * heads of each row (q and k; v is left alone) in the half-split layout. cos/sin: [rows, hd]. */
void rope_inplace(float *x, const float *cos, const float *sin, int64_t rows, int64_t heads, int64_t n_rot,
                  int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * hd, *s = sin + r * hd;
        for (int64_t h = 0; h < n_rot; h++) {
            float *p = x + (r * heads + h) * hd;
            for (int64_t j = 0; j < half; j++) {
                float a = p[j], b = p[j + half];
                p[j] = a * c[j] - b * s[j];
                p[j + half] = b * c[j + half] + a * s[j + half];
            }
        }
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float d = 0.f;
    if (n % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        return hsum(acc);
    }
    for (; i < n; i++) d += a[i] * b[i];
    return d;
}

/* One decode step of attention for b rows, each continuing its own KV-cache slot (grouped-query).
 * proj [b, (nh + 2 nkv) * hd]: each row's q, k, v heads, rope already applied. kc, vc: one layer of the
 * cache, [slots, nkv, cap, hd]. Row r's new key/value is stored at position pos[r] of slot slots[r],
 * then its query attends to positions 0..pos[r] of that slot; with a sliding window > 0, to the last
 * `window` of them only (pos[r] - window + 1 .. pos[r]). out: [b, nh * hd]. */
void attn_decode_rows(const float *proj, float *kc, float *vc, const int64_t *slots, const int64_t *pos, float *out,
                      int64_t b, int64_t nh, int64_t nkv, int64_t cap, int64_t hd, int64_t window, float scale,
                      int threads) {
    const int64_t group = nh / nkv, width = (nh + 2 * nkv) * hd;
    for (int64_t r = 0; r < b; r++)
        for (int64_t h = 0; h < nkv; h++) {
            int64_t at = ((slots[r] * nkv + h) * cap + pos[r]) * hd;
            memcpy(kc + at, proj + r * width + (nh + h) * hd, sizeof(float) * hd);
            memcpy(vc + at, proj + r * width + (nh + nkv + h) * hd, sizeof(float) * hd);
        }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t rh = 0; rh < b * nh; rh++) {
        const int64_t r = rh / nh, h = rh % nh;
        const int64_t first = window > 0 && pos[r] + 1 > window ? pos[r] + 1 - window : 0, len = pos[r] + 1 - first;
        const float *qh = proj + r * width + h * hd;
        const float *kh = kc + ((slots[r] * nkv + h / group) * cap + first) * hd;
        const float *vh = vc + ((slots[r] * nkv + h / group) * cap + first) * hd;
        float *sc = malloc(sizeof(float) * len), mx = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < len; j++) {
            sc[j] = dot(qh, kh + j * hd, hd) * scale;
            mx = sc[j] > mx ? sc[j] : mx;
        }
        float *o = out + r * nh * hd + h * hd;
        for (int64_t i = 0; i < hd; i++) o[i] = 0.f;
        for (int64_t j = 0; j < len; j++) {
            float w = expf(sc[j] - mx);
            sum += w;
            for (int64_t i = 0; i < hd; i++) o[i] += w * vh[j * hd + i];
        }
        for (int64_t i = 0; i < hd; i++) o[i] /= sum;
        free(sc);
    }
}

/* -- a whole decode step's blocks in one call -------------------------------------------------------------
 * At a few rows a step, a Llama-style block is eleven small operations, and dispatching each from Python
 * (module calls, checks, argument marshalling) cost a third of a one-row step. This runs every block of
 * the stack here, calling the same kernels in the same order as the per-operation path, so the result is
 * bit-identical to it. */
typedef struct PW {
    const void *codes;
    const float *scale, *zero, *bias; /* bias may be NULL */
    int64_t n, k;                     /* n: the whole matrix's rows, segments included */
    int64_t kind;                     /* KIND_Q8, KIND_Q4, KIND_Q5 or KIND_Q6 */
    int64_t rows;                     /* this segment's rows */
    const struct PW *next;            /* the rows below, of another kind (NULL: none) */
} PW;

typedef struct {
    const float *attn_norm, *mlp_norm;
    PW qkv, o, gate_up, down;
    int64_t window; /* sliding window of the attention; 0: the whole context */
} Layer;

static void product(const float *x, const PW *w, float *y, int64_t M, int threads) {
    int64_t r0 = 0;
    for (const PW *s = w; s; r0 += s->rows, s = s->next)
        gemv(x, s->codes, s->scale, s->zero, y + r0, M, s->rows, w->n, w->k, threads, (int)s->kind, 1);
    if (w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < w->n; j++) y[m * w->n + j] += w->bias[j];
}

static void add_into(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + y[i];
}

/* x [b, dim] (updated in place): the hidden states entering the first block; b rows, each continuing
 * its own KV slot at pos[r]. kc / vc: the whole cache, [layers, slots, nkv, cap, hd]. cos / sin: [b, hd]. */
void decode_stack(float *x, int64_t b, const Layer *layers, int64_t n_layers, float *kc, float *vc,
                  const int64_t *slots, const int64_t *pos, const float *cos, const float *sin, int64_t dim,
                  int64_t nh, int64_t nkv, int64_t slots_n, int64_t cap, int64_t hd, int64_t ffn, float eps,
                  float attn_scale, int threads) {
    const int64_t width = (nh + 2 * nkv) * hd, layer_size = slots_n * nkv * cap * hd;
    float *h = malloc(sizeof(float) * b * dim), *proj = malloc(sizeof(float) * b * width);
    float *att = malloc(sizeof(float) * b * nh * hd), *res = malloc(sizeof(float) * b * dim);
    float *gu = malloc(sizeof(float) * b * 2 * ffn), *act = malloc(sizeof(float) * b * ffn);
    for (int64_t l = 0; l < n_layers; l++) {
        const Layer *L = layers + l;
        rms_norm(x, L->attn_norm, h, b, dim, eps);
        product(h, &L->qkv, proj, b, threads);
        rope_inplace(proj, cos, sin, b, nh + 2 * nkv, nh + nkv, hd);
        attn_decode_rows(proj, kc + l * layer_size, vc + l * layer_size, slots, pos, att, b, nh, nkv, cap, hd,
                         L->window, attn_scale, threads);
        product(att, &L->o, res, b, threads);
        add_into(x, res, b * dim);
        rms_norm(x, L->mlp_norm, h, b, dim, eps);
        product(h, &L->gate_up, gu, b, threads);
        swiglu(gu, act, b, ffn);
        product(act, &L->down, res, b, threads);
        add_into(x, res, b * dim);
    }
    free(h); free(proj); free(att); free(res); free(gu); free(act);
}
