/* The decode step's small fused ops and the whole block stack in one call; included by kernels.c, whose
 * products (gemv) and helpers they use. */

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
