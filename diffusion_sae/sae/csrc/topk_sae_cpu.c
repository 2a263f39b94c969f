/* CPU kernels for training TopK SAEs: per-token top-k selection and the fused sparse decoder + loss.
 *
 * Plain C with raw pointers (no torch headers): compiled in about a second by the system C compiler
 * and called through ctypes (see ../native.py). Every function is fp32 except the selection's input,
 * which may be the bf16 encoder product (the bit pattern as uint16). OpenMP splits work by token or by
 * latent; no two threads write the same output, so results do not depend on the thread count.
 *
 * Layouts (row-major, contiguous):
 *   pre [N, L] (ld = row stride), xn / xs / recon / r / e [N, d], W_dec / W_enc / gradients [L, d],
 *   vals / q [N, k] f32, cols [N, k] int64, aux_* [N, ka].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16 bits, round to nearest even (inputs here are finite). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* k-th largest of a small array (destroys it): quickselect. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float piv = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > piv) i++;
            while (a[j] < piv) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;
    }
    return a[want];
}

/* Top k of the candidates (values cv, ids ci; n >= k, no NaN: load_row maps NaN to -inf), into
 * hv/hi: the k-th largest value by quickselect on a copy, then everything above it, then ties up to
 * k. Every one of the k output slots is written with a candidate's id, whatever the values: the
 * decoder indexes W_dec with them (an unwritten slot once held garbage and crashed it). */
static void select_topk(const float *cv, const int64_t *ci, int64_t n, int64_t k, float *scratch,
                        float *hv, int64_t *hi) {
    int64_t m = 0;
    if (n >= k && k > 0) {
        memcpy(scratch, cv, sizeof(float) * (size_t)n);
        float tau = kth_largest(scratch, n, k);
        for (int64_t t = 0; t < n && m < k; t++)
            if (cv[t] > tau) { hv[m] = cv[t]; hi[m] = ci[t]; m++; }
        for (int64_t t = 0; t < n && m < k; t++)
            if (cv[t] == tau) { hv[m] = cv[t]; hi[m] = ci[t]; m++; }
    }
    /* unreachable with ordered values; a safe filler (value 0 contributes nothing) otherwise */
    for (int64_t t = 0; m < k; t++, m++) { hv[m] = 0.f; hi[m] = n > 0 ? ci[t % n] : 0; }
}

#define CHUNK 32

/* One row, already in fp32 (bias added) in `row`: exact top-k in three steps, all in cache:
 *   1. the maxima of chunks of 32 columns;
 *   2. t = the k-th largest chunk maximum: k distinct elements are >= t, so every element of the
 *      row's top k is >= t too;
 *   3. the elements >= t (for k = 32 of 3072, about 40) are gathered and the top k picked. */
static void row_topk(const float *row, int64_t L, int64_t k, float *cmax, float *cv, int64_t *ci,
                     float *scratch, float *hv, int64_t *hi) {
    int64_t nch = L / CHUNK, n = 0, j = 0;
    if (nch < k) {  /* short rows: every element is a candidate */
        for (j = 0; j < L; j++) { cv[j] = row[j]; ci[j] = j; }
        select_topk(cv, ci, L, k, scratch, hv, hi);
        return;
    }
    for (int64_t c = 0; c < nch; c++) {
#if defined(__AVX512F__)
        cmax[c] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_loadu_ps(row + c * CHUNK), _mm512_loadu_ps(row + c * CHUNK + 16)));
#else
        float m = row[c * CHUNK];
        for (int64_t u = 1; u < CHUNK; u++) m = row[c * CHUNK + u] > m ? row[c * CHUNK + u] : m;
        cmax[c] = m;
#endif
    }
    float t = kth_largest(cmax, nch, k);
#if defined(__AVX512F__)
    /* compress in registers, then full-width stores (the buffers have 16 slots of slack): the
       memory-destination compress-store is microcoded and slow on some CPUs (Zen 4) */
    __m512 vt = _mm512_set1_ps(t);
    __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
    for (; j + 16 <= L; j += 16) {
        __m512 v = _mm512_loadu_ps(row + j);
        __mmask16 m = _mm512_cmp_ps_mask(v, vt, _CMP_GE_OQ);
        if (!m) continue;
        _mm512_storeu_ps(cv + n, _mm512_maskz_compress_ps(m, v));
        __m512i base = _mm512_add_epi64(_mm512_set1_epi64(j), iota);
        _mm512_storeu_si512(ci + n, _mm512_maskz_compress_epi64((__mmask8)(m & 0xff), base));
        int lo = __builtin_popcount(m & 0xff);
        _mm512_storeu_si512(ci + n + lo, _mm512_maskz_compress_epi64((__mmask8)(m >> 8), _mm512_add_epi64(base, eight)));
        n += __builtin_popcount(m);
    }
#endif
    for (; j < L; j++) { cv[n] = row[j]; ci[n] = j; n += (row[j] >= t); }
    if (n < k) {  /* cannot happen with ordered values (k chunk maxima are >= t); stay exact anyway */
        for (j = 0; j < L; j++) { cv[j] = row[j]; ci[j] = j; }
        n = L;
    }
    select_topk(cv, ci, n, k, scratch, hv, hi);
}

/* row[j] = float(src[off + j]) + bias[j] (bias may be NULL): the row, in fp32, in cache. NaNs
 * become -inf (NaN compares false with everything, which broke the quickselect's invariants and
 * left output slots unwritten); returns 1 if the row had any, so that the caller can refuse it. */
static int load_row(const void *pre, int is_bf16, int64_t off, int64_t L, const float *bias, float *row) {
    int64_t j = 0;
    int bad = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= L; j += 16) {
        __m512 v;
        if (is_bf16) {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)pre + off + j)));
            v = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        } else {
            v = _mm512_loadu_ps((const float *)pre + off + j);
        }
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        if (nan) { v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(-INFINITY)); bad = 1; }
        _mm512_storeu_ps(row + j, v);
    }
#endif
    for (; j < L; j++) {
        float v = is_bf16 ? bf16_to_f32(((const uint16_t *)pre)[off + j]) : ((const float *)pre)[off + j];
        v = bias ? v + bias[j] : v;
        if (isnan(v)) { v = -INFINITY; bad = 1; }
        row[j] = v;
    }
    return bad;
}

/* Top-k of every row of ReLU(pre + bias) for a [N, L] matrix (fp32, or bf16 given as its uint16
 * bits; row stride ld). bias [L] may be NULL. col_mask [L] (may be NULL): only columns with a
 * non-zero byte may be picked (AuxK's dead latents; the caller ensures at least k). Values are
 * clamped at 0 after the selection (ReLU first, as in the torch path: the same values). Output order
 * within a row is unspecified (like torch.topk(sorted=False)); ties are broken arbitrarily.
 * Returns how many rows held a NaN (selected as if it were -inf; the caller refuses them): every
 * index written lies in [0, L) whatever the values. */
static int64_t topk_rows(const void *pre, int is_bf16, int64_t N, int64_t L, int64_t ld, int64_t k,
                         const uint8_t *col_mask, const float *bias, float *vals, int64_t *idx, int nthreads) {
    int64_t n_bad = 0;
    if (N <= 0 || L <= 0 || k <= 0 || k > L) return 0;
    #pragma omp parallel num_threads(nthreads) reduction(+:n_bad)
    {
        float *row = (float *)malloc(sizeof(float) * (size_t)L);
        float *cmax = (float *)malloc(sizeof(float) * (size_t)(L / CHUNK + 1));
        float *cv = (float *)malloc(sizeof(float) * (size_t)(L + 16));
        int64_t *ci = (int64_t *)malloc(sizeof(int64_t) * (size_t)(L + 16));
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(L + 16));
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            n_bad += load_row(pre, is_bf16, i * ld, L, bias, row);
            float *hv = vals + i * k;
            int64_t *hi = idx + i * k;
            if (col_mask) {
                int64_t n = 0;
                for (int64_t j = 0; j < L; j++)
                    if (col_mask[j]) { cv[n] = row[j]; ci[n] = j; n++; }
                select_topk(cv, ci, n, k, scratch, hv, hi);
            } else {
                row_topk(row, L, k, cmax, cv, ci, scratch, hv, hi);
            }
            for (int64_t s = 0; s < k; s++) hv[s] = hv[s] > 0.f ? hv[s] : 0.f;
        }
        free(row); free(cmax); free(cv); free(ci); free(scratch);
    }
    return n_bad;
}

int64_t topk_rows_f32(const float *pre, int64_t N, int64_t L, int64_t ld, int64_t k, const uint8_t *col_mask,
                      const float *bias, float *vals, int64_t *idx, int nthreads) {
    return topk_rows(pre, 0, N, L, ld, k, col_mask, bias, vals, idx, nthreads);
}

int64_t topk_rows_bf16(const uint16_t *pre, int64_t N, int64_t L, int64_t ld, int64_t k, const uint8_t *col_mask,
                       const float *bias, float *vals, int64_t *idx, int nthreads) {
    return topk_rows(pre, 1, N, L, ld, k, col_mask, bias, vals, idx, nthreads);
}

/* acc += sum_s v_s W[c_s] over the n selected rows (zero values and ids outside [0, L) skipped). */
static inline void add_rows(float *acc, const float *v, const int64_t *c, int64_t n, const float *W, int64_t d,
                            int64_t L) {
    for (int64_t s = 0; s < n; s++) {
        if (v[s] == 0.f || (uint64_t)c[s] >= (uint64_t)L) continue;
        const float *w = W + c[s] * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) acc[j] += v[s] * w[j];
    }
}

/* out_s = x . W[c_s] (0 for an id outside [0, L)). `omp simd reduction` lets the compiler split each
 * sum into vector lanes (plain C forbids reassociating a float sum, which leaves a serial chain of
 * dependent adds). */
static inline void row_dots(const float *x, const int64_t *c, int64_t n, const float *W, int64_t d, int64_t L,
                            float *out) {
    for (int64_t s = 0; s < n; s++) {
        if ((uint64_t)c[s] >= (uint64_t)L) { out[s] = 0.f; continue; }
        const float *w = W + c[s] * d;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t j = 0; j < d; j++) dot += x[j] * w[j];
        out[s] = dot;
    }
}

static inline void to_bf16(const float *x, uint16_t *out, int64_t d) {
    #pragma omp simd
    for (int64_t j = 0; j < d; j++) out[j] = f32_to_bf16(x[j]);
}

/* Forward of the sparse decoder and the losses, one token per iteration:
 *   recon_i = b_dec + sum_s vals_is W_dec[cols_is]          r_i = xn_i - recon_i
 *   sse_i   = |r_i|^2                                       q_is = r_i . W_dec[cols_is]
 * with AuxK (ka > 0):
 *   e_i = sum_s aux_vals_is W_dec[aux_cols_is] - r_i        aux_sse_i = |e_i|^2
 *   qa_is = e_i . W_dec[aux_cols_is]
 * q and qa are what the backward needs for the gradients of vals and aux_vals; computing them here
 * reuses the decoder rows while they are still in cache. r_h / e_h (may be NULL) receive bf16 copies
 * of r and e for the mixed-precision backward. (Blocking the feature axis so that the
 * gathers hit L2 was measured slower: 64-float pieces leave too little work per gathered row.)
 * An id outside [0, L) (W_dec's rows) is skipped, never read: no input may crash the process. */
void sae_decode_fwd(const float *xn, const float *vals, const int64_t *cols, const float *aux_vals,
                    const int64_t *aux_cols, const float *W_dec, const float *b_dec, int64_t N, int64_t d,
                    int64_t k, int64_t ka, int64_t L, float *recon, float *r, float *q, double *sse, float *e,
                    float *qa, double *aux_sse, uint16_t *r_h, uint16_t *e_h, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < N; i++) {
        float *ri = recon + i * d, *res = r + i * d;
        const float *xi = xn + i * d;
        memcpy(ri, b_dec, d * sizeof(float));
        add_rows(ri, vals + i * k, cols + i * k, k, W_dec, d, L);
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t c = 0; c < d; c++) {
            float t = xi[c] - ri[c];
            res[c] = t;
            acc += t * t;
        }
        sse[i] = acc;
        if (r_h) to_bf16(res, r_h + i * d, d);
        row_dots(res, cols + i * k, k, W_dec, d, L, q + i * k);
        if (ka > 0) {
            float *ei = e + i * d;
            for (int64_t c = 0; c < d; c++) ei[c] = -res[c];
            add_rows(ei, aux_vals + i * ka, aux_cols + i * ka, ka, W_dec, d, L);
            float a2 = 0.f;
            #pragma omp simd reduction(+:a2)
            for (int64_t c = 0; c < d; c++) a2 += ei[c] * ei[c];
            aux_sse[i] = a2;
            if (e_h) to_bf16(ei, e_h + i * d, d);
            row_dots(ei, aux_cols + i * ka, ka, W_dec, d, L, qa + i * ka);
        }
    }
}

/* Weight gradients, one latent per iteration (entries regrouped by latent with a counting sort, so
 * every output row is written by one thread, once, in a fixed order):
 *   dW_dec[j] = sum_{(i,s): cols_is = j} c_dec * src_i,  c_dec = s_main vals_is (src = r) or s_aux aux_vals_is (src = e)
 *   dW_enc[j] = sum c_enc * xs_i,                         c_enc = s_main q_is [vals_is > 0]  or  s_aux qa_is [aux_vals_is > 0]
 *   db_enc[j] = sum c_enc
 * If W_dec is given, the component of dW_dec[j] along the unit-norm row W_dec[j] is removed as the
 * row is finished (the trainer's decoder constraint; linear, so it commutes with summing gradients
 * across processes). Latents with no entry get zero rows (no separate zero fill). xs, r, e are fp32,
 * or bf16 bits when src_bf16 (mixed precision: bf16 inputs, fp32 accumulation, as autocast does for a
 * matmul's backward). */
void sae_sparse_bwd(const void *xs, const void *r, const void *e, int src_bf16, const float *vals,
                    const int64_t *cols, const float *q, const float *aux_vals, const int64_t *aux_cols,
                    const float *qa, const float *W_dec, int64_t N, int64_t L, int64_t d, int64_t k, int64_t ka,
                    float s_main, float s_aux, float *dW_dec, float *dW_enc, float *db_enc, int nthreads) {
    int64_t M = N * k, MA = N * ka, T = M + MA;
    int64_t *start = (int64_t *)calloc((size_t)L + 1, sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc(((size_t)L + 1) * sizeof(int64_t));
    int64_t *ent = (int64_t *)malloc((size_t)(T > 0 ? T : 1) * sizeof(int64_t));
    /* ids outside [0, L) are dropped (never indexed): no input may crash the process */
#define IN_RANGE(c) ((uint64_t)(c) < (uint64_t)L)
    for (int64_t t = 0; t < M; t++) if (IN_RANGE(cols[t])) start[cols[t] + 1]++;
    for (int64_t t = 0; t < MA; t++) if (IN_RANGE(aux_cols[t])) start[aux_cols[t] + 1]++;
    for (int64_t j = 0; j < L; j++) start[j + 1] += start[j];
    memcpy(fill, start, ((size_t)L + 1) * sizeof(int64_t));
    for (int64_t t = 0; t < M; t++) if (IN_RANGE(cols[t])) ent[fill[cols[t]]++] = t;
    for (int64_t t = 0; t < MA; t++) if (IN_RANGE(aux_cols[t])) ent[fill[aux_cols[t]]++] = M + t;
#undef IN_RANGE

    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t j = 0; j < L; j++) {
        float *gd = dW_dec + j * d, *ge = dW_enc + j * d;
        memset(gd, 0, d * sizeof(float));
        memset(ge, 0, d * sizeof(float));
        double gb = 0.0;
        for (int64_t p = start[j]; p < start[j + 1]; p++) {
            int64_t t = ent[p], i;
            float cd, ce;
            const void *src;
            if (t < M) {
                i = t / k;
                float v = vals[t];
                cd = s_main * v;
                ce = v > 0.f ? s_main * q[t] : 0.f;
                src = r;
            } else {
                t -= M;
                i = t / ka;
                float v = aux_vals[t];
                cd = s_aux * v;
                ce = v > 0.f ? s_aux * qa[t] : 0.f;
                src = e;
            }
            if (src_bf16) {  /* half the bytes of the row gathers, which bound this pass */
                const uint16_t *sr = (const uint16_t *)src + i * d, *xi = (const uint16_t *)xs + i * d;
                #pragma omp simd
                for (int64_t c = 0; c < d; c++) {
                    gd[c] += cd * bf16_to_f32(sr[c]);
                    ge[c] += ce * bf16_to_f32(xi[c]);
                }
            } else {
                const float *sr = (const float *)src + i * d, *xi = (const float *)xs + i * d;
                #pragma omp simd
                for (int64_t c = 0; c < d; c++) {
                    gd[c] += cd * sr[c];
                    ge[c] += ce * xi[c];
                }
            }
            gb += ce;
        }
        db_enc[j] = (float)gb;
        if (W_dec) {
            const float *w = W_dec + j * d;
            float par = 0.f;
            #pragma omp simd reduction(+:par)
            for (int64_t c = 0; c < d; c++) par += gd[c] * w[c];
            #pragma omp simd
            for (int64_t c = 0; c < d; c++) gd[c] -= par * w[c];
        }
    }
    free(start);
    free(fill);
    free(ent);
}
