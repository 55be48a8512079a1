/* Matrix-vector products straight from GGUF block-quantized weights (AVX2 + FMA, OpenMP).
 *
 * Decoding a token reads every weight once, so on CPUs it is bound by memory bandwidth; reading the
 * 4- or 8-bit codes instead of fp32 weights is what makes it fast. Weights are decoded to fp32 in
 * registers and multiplied with fp32 activations, so results match the dequantized weights up to
 * float rounding. Groups are 32 weights along K with one scale (and, for 4-bit, one offset) each.
 *
 *   y[m, n] = sum_g  scale[n, g] * sum_j code(n, 32g + j) * x[m, 32g + j]  +  zero[n, g] * sum_j x[m, 32g + j]
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 8  /* must match quant.py */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* One output element: row `row` of 4-bit codes against one activation row. Two accumulators in
 * registers, alternating groups, keep the FMA latency chains short. */
static inline float q4_dot(const uint8_t *row, const float *sc, const float *ze, const float *x,
                           const float *xsum, int64_t G) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float zacc = 0.f;
    for (int64_t g = 0; g < G; g++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(row + g * 16));
        __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        const float *xp = x + g * 32;
        __m256 t = _mm256_mul_ps(u8x8(lo), _mm256_loadu_ps(xp));
        __m256 u = _mm256_mul_ps(u8x8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp + 8));
        t = _mm256_fmadd_ps(u8x8(hi), _mm256_loadu_ps(xp + 16), t);
        u = _mm256_fmadd_ps(u8x8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp + 24), u);
        __m256 s = _mm256_set1_ps(sc[g]);
        if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_add_ps(t, u), s, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_add_ps(t, u), s, acc0);
        zacc += ze[g] * xsum[g];
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + zacc;
}

static inline float q8_dot(const int8_t *row, const float *sc, const float *x, int64_t G) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int8_t *b = row + g * 32;
        const float *xp = x + g * 32;
        __m256 t = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)b)), _mm256_loadu_ps(xp));
        __m256 u = _mm256_mul_ps(i8x8(_mm_loadl_epi64((const __m128i *)(b + 8))), _mm256_loadu_ps(xp + 8));
        t = _mm256_fmadd_ps(i8x8(_mm_loadl_epi64((const __m128i *)(b + 16))), _mm256_loadu_ps(xp + 16), t);
        u = _mm256_fmadd_ps(i8x8(_mm_loadl_epi64((const __m128i *)(b + 24))), _mm256_loadu_ps(xp + 24), u);
        __m256 s = _mm256_set1_ps(sc[g]);
        if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_add_ps(t, u), s, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_add_ps(t, u), s, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

/* 4-bit codes [N, K/2] in GGML order: byte j of a group holds element j (low nibble) and j + 16 (high). */
void q4_gemv(const float *x, const uint8_t *codes, const float *scale, const float *zero, float *y,
             int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t G = K / 32;
    float *xsum = malloc(sizeof(float) * M * G);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0.f;
            for (int j = 0; j < 32; j++) s += x[m * K + g * 32 + j];
            xsum[m * G + g] = s;
        }
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) y[n] = q4_dot(codes + n * (K / 2), scale + n * G, zero + n * G, x, xsum, G);
        free(xsum);
        return;
    }
    /* Several rows: decode each group's codes once and use them for every row. */
    const __m128i mask = _mm_set1_epi8(0x0F);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * (K / 2);
        __m256 acc[MAX_ROWS];
        float zacc[MAX_ROWS];
        for (int64_t m = 0; m < M; m++) { acc[m] = _mm256_setzero_ps(); zacc[m] = 0.f; }
        for (int64_t g = 0; g < G; g++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(row + g * 16));
            __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            __m256 w0 = u8x8(lo), w1 = u8x8(_mm_srli_si128(lo, 8)), w2 = u8x8(hi), w3 = u8x8(_mm_srli_si128(hi, 8));
            __m256 sc = _mm256_set1_ps(scale[n * G + g]);
            float ze = zero[n * G + g];
            for (int64_t m = 0; m < M; m++) {
                const float *xp = x + m * K + g * 32;
                __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xp));
                t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), t);
                t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + 16), t);
                t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + 24), t);
                acc[m] = _mm256_fmadd_ps(t, sc, acc[m]);
                zacc[m] += ze * xsum[m * G + g];
            }
        }
        for (int64_t m = 0; m < M; m++) y[m * N + n] = hsum(acc[m]) + zacc[m];
    }
    free(xsum);
}

/* Signed 8-bit codes [N, K], one scale per group (GGUF Q8_0). */
void q8_gemv(const float *x, const int8_t *codes, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
             int threads) {
    const int64_t G = K / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)  /* the row's codes stay in L1 across the batch */
            y[m * N + n] = q8_dot(codes + n * K, scale + n * G, x + m * K, G);
}
