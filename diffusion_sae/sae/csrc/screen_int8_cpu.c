/* Int8 screening of the TopK encoder: the top-m candidates of every token from an int8 product
 * (AVX512-VNNI), then the exact pre-activations of those m candidates and their top k.
 *
 * Why: at L = 12288 the dense encoder product is 2/3 of a CPU training step even in bf16. VNNI's
 * u8 x s8 dot products do twice the multiply-adds per instruction of AVX512-BF16's, and the
 * product's [N, L] output is never written: each 12 x 32 tile is scaled, compared with the
 * running threshold of its token and dropped unless it can enter that token's top m. The int8
 * values only choose candidates; the values (and the final top k) come from the exact
 * pre-activations of the m = 2k candidates, in the precision of the step (fp32, or bf16 inputs
 * with fp32 sums). screen_rescore then certifies every token (see there): a token whose k-th exact
 * value is not clear of the m-th int8 value by z standard deviations of the rounding error is
 * flagged, and the caller recomputes it on the dense product.
 *
 * Quantisation: per-token scale for x (u8 with offset 128, as VNNI wants an unsigned operand),
 * per-latent scale for W_enc (s8); acc - 128 * sum_k w_s8 removes the offset exactly. Optional
 * per-dimension factors (x_d / s_d, w_d * s_d; native._smoothing picks them) tame outlier dimensions.
 *
 * Layouts: xq [N/12 blocks][d4/4][12] int32 (4 u8 each; rows past N repeat the last row),
 * Wp [Lp/32 panels][d4/4][32][4] s8 (latents past L are zero), d4 = d rounded up to 4,
 * Lp = L rounded up to 32. Padded latents get a -inf bias and are never candidates.
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

#define MR 12
#define NR 32

int screen_int8_supported(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

/* max |a_j mul_j| (returned) and sum (a_j mul_j)^2 (into *sumsq) of one row; mul may be NULL (ones) */
static inline float row_absmax(const float *a, const float *mul, int64_t d, float *sumsq) {
    __m512 m = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) {
        __mmask16 live = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, a + j);
        if (mul) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, mul + j));
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
        s2 = _mm512_fmadd_ps(v, v, s2);
    }
    *sumsq = _mm512_reduce_add_ps(s2);
    return _mm512_reduce_max_ps(m);
}

/* One row a[0..d) (times mul, when not NULL) quantised by round(a * mul * inv) (|.| <= 127; + 128
 * when `offset`) into 4-byte quads, quad q written at dst + q * stride (the kernel's interleaved
 * layouts); d is padded with zeros to whole quads. Returns the sum of the signed values. If bf is
 * not NULL, the row itself (without mul) goes there in bf16. */
static inline int32_t quantize_row(const float *a, const float *mul, int64_t d, float inv, int offset, uint8_t *dst,
                                   int64_t stride, uint16_t *bf) {
    int64_t nq = (d + 3) / 4;
    __m512 vi = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512(), off = _mm512_set1_epi32(offset ? 128 : 0);
    for (int64_t j = 0; j < d; j += 16) {
        __mmask16 live = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(live, a + j);
#if defined(__AVX512BF16__)
        if (bf) _mm256_mask_storeu_epi16(bf + j, live, (__m256i)_mm512_cvtneps_pbh(v));
#endif
        if (mul) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(live, mul + j));
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, vi));  /* round to nearest even */
        sum = _mm512_add_epi32(sum, q);
        uint32_t quads[4];
        _mm_storeu_si128((__m128i *)quads, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
        for (int u = 0; u < 4 && j / 4 + u < nq; u++) memcpy(dst + (j / 4 + u) * stride, &quads[u], 4);
    }
#if !defined(__AVX512BF16__)
    if (bf) for (int64_t j = 0; j < d; j++) {
        uint32_t u; memcpy(&u, a + j, 4); u += 0x7FFFu + ((u >> 16) & 1u); bf[j] = (uint16_t)(u >> 16);
    }
#endif
    return _mm512_reduce_add_epi32(sum);
}

/* x [N, d] fp32, times the per-dimension smoothing factors mul [d] (NULL: none), -> xq (layout
 * above, u8 = s8 + 128), per-token scales sx [N] and squared norms xn2 [N] (of x * mul). */
void screen_quantize_x(const float *x, const float *mul, int64_t N, int64_t d, uint8_t *xq, float *sx, float *xn2,
                       int nthreads) {
    int64_t nq = (d + 3) / 4, nblk = (N + MR - 1) / MR;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblk; b++) {
        for (int r = 0; r < MR; r++) {
            int64_t i = b * MR + r < N ? b * MR + r : N - 1;
            const float *a = x + i * d;
            float n2, mx = row_absmax(a, mul, d, &n2), inv = mx > 0.f ? 127.f / mx : 0.f;
            if (b * MR + r < N) { sx[i] = mx / 127.f; xn2[i] = n2; }
            quantize_row(a, mul, d, inv, 1, xq + (b * nq * MR + r) * 4, MR * 4, NULL);
        }
    }
}

/* W [L, d] fp32, times the per-dimension factors mul [d] (NULL: none; the inverse of x's), -> Wp
 * (layout above), per-latent scales sw [Lp], 128 * row sums wsum [Lp] and squared row norms wn2 [Lp];
 * bias [L] -> biasp [Lp] (-inf past L); W in bf16 into Wbf [L, d] when not NULL (the exact
 * operand under bf16 autocast, made in the same pass over W). */
void screen_pack_w(const float *W, const float *mul, const float *bias, int64_t L, int64_t d, int8_t *Wp, float *sw,
                   int32_t *wsum, float *biasp, float *wn2, uint16_t *Wbf, int nthreads) {
    int64_t nq = (d + 3) / 4, np = (L + NR - 1) / NR;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t p = 0; p < np; p++) {
        int8_t *panel = Wp + p * nq * NR * 4;
        for (int c = 0; c < NR; c++) {
            int64_t j = p * NR + c;
            if (j >= L) {
                for (int64_t q = 0; q < nq; q++) memset(panel + (q * NR + c) * 4, 0, 4);
                sw[j] = 0.f; wsum[j] = 0; biasp[j] = -INFINITY; wn2[j] = 0.f;
                continue;
            }
            const float *a = W + j * d;
            float n2, mx = row_absmax(a, mul, d, &n2), inv = mx > 0.f ? 127.f / mx : 0.f;
            wn2[j] = n2;
            int32_t s = quantize_row(a, mul, d, inv, 0, (uint8_t *)panel + c * 4, NR * 4, Wbf ? Wbf + j * d : NULL);
            sw[j] = mx / 127.f; wsum[j] = 128 * s; biasp[j] = bias ? bias[j] : 0.f;
        }
    }
}

/* Append the lanes of (v, id) selected by k at vdst[n], idst[n]; returns the new count. Compress in
 * registers, then full-width stores (the destinations have 16 slots of slack): the memory-destination
 * compress-store is microcoded and slow on Zen 4. */
static inline int64_t append_lanes(float *vdst, int32_t *idst, int64_t n, __mmask16 k, __m512 v, __m512i id) {
    _mm512_storeu_ps(vdst + n, _mm512_maskz_compress_ps(k, v));
    _mm512_storeu_si512(idst + n, _mm512_maskz_compress_epi32(k, id));
    return n + __builtin_popcount(k);
}

/* Keep the m largest of a row's n candidates (values cv, ids ci, in place; ties broken by
 * position) and return the m-th largest value, the row's new threshold. Called often (every time a
 * row's buffer fills), so it is a branch-free AVX-512 quickselect: every round splits the working
 * set three ways around a pivot (>, ==, <) with in-register compresses; the pivot is the sample
 * element at the quantile being looked for. `sv`/`si` hold COMPACT_SCRATCH(n) slots of scratch. */
#define COMPACT_SCRATCH(n) (5 * ((n) + 16))
static float compact(float *cv, int32_t *ci, int64_t *n, int64_t m, float *sv, int32_t *si) {
    int64_t na = *n, need = m, kept = 0, cap = na + 16;
    /* two working buffers (ping-pong; the first round reads cv), results (2 slots), equals */
    float *w1v = sv, *w2v = sv + cap, *rv = sv + 2 * cap, *ev = sv + 4 * cap;
    int32_t *w1i = si, *w2i = si + cap, *ri = si + 2 * cap, *ei = si + 4 * cap;
    float *av = cv, *bv = w1v;
    int32_t *ai = ci, *bi = w1i;
    float t = INFINITY;
    while (need > 0) {
        if (na <= 16) {  /* small: insertion sort, descending, take `need` */
            for (int64_t s = 1; s < na; s++) {
                float v = av[s]; int32_t id = ai[s]; int64_t u = s;
                while (u > 0 && av[u - 1] < v) { av[u] = av[u - 1]; ai[u] = ai[u - 1]; u--; }
                av[u] = v; ai[u] = id;
            }
            for (int64_t s = 0; s < need; s++) { rv[kept + s] = av[s]; ri[kept + s] = ai[s]; }
            kept += need; t = av[need - 1]; need = 0;
            break;
        }
        float smp[9];
        for (int s = 0; s < 9; s++) {
            float v = av[(na - 1) * s / 8]; int u = s;
            while (u > 0 && smp[u - 1] < v) { smp[u] = smp[u - 1]; u--; }
            smp[u] = v;
        }
        int64_t q = (9 * need) / na;  /* sample rank nearest the wanted quantile (descending) */
        float piv = smp[q > 8 ? 8 : q];
        __m512 vp = _mm512_set1_ps(piv);
        int64_t ng = 0, ne = 0, nl = 0;
        for (int64_t j = 0; j < na; j += 16) {
            __mmask16 live = na - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (na - j)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(live, av + j);
            __m512i id = _mm512_maskz_loadu_epi32(live, ai + j);
            __mmask16 g = _mm512_mask_cmp_ps_mask(live, v, vp, _CMP_GT_OQ);
            __mmask16 e = _mm512_mask_cmp_ps_mask(live, v, vp, _CMP_EQ_OQ);
            __mmask16 l = live & ~g & ~e;
            ng = append_lanes(rv + kept, ri + kept, ng, g, v, id);
            ne = append_lanes(ev, ei, ne, e, v, id);
            nl = append_lanes(bv, bi, nl, l, v, id);
        }
        if (ng > need) {  /* the answer lies among the greater ones: work on them */
            memcpy(bv, rv + kept, sizeof(float) * (size_t)ng);
            memcpy(bi, ri + kept, sizeof(int32_t) * (size_t)ng);
            na = ng;
        } else {
            kept += ng; need -= ng;
            if (need == 0) { t = INFINITY; for (int64_t s = 0; s < kept; s++) t = rv[s] < t ? rv[s] : t; break; }
            int64_t take = ne < need ? ne : need;
            memcpy(rv + kept, ev, sizeof(float) * (size_t)take);
            memcpy(ri + kept, ei, sizeof(int32_t) * (size_t)take);
            kept += take; need -= take;
            if (need == 0) { t = piv; break; }
            na = nl;
        }
        /* the working set now lives in b: read it next round, write the other buffer */
        av = bv; ai = bi;
        bv = av == w1v ? w2v : w1v; bi = ai == w1i ? w2i : w1i;
    }
    memcpy(cv, rv, sizeof(float) * (size_t)m);
    memcpy(ci, ri, sizeof(int32_t) * (size_t)m);
    *n = m;
    return t;
}

/* One 12 x 32 tile of the u8 x s8 product over the whole depth, 24 accumulators in registers
 * (named, not an array: GCC spills an array of vectors to the stack). */
static inline void tile_12x32(const int32_t *xb, const int8_t *wp, int64_t nq, __m512i out[MR][2]) {
#define ACC(r) __m512i a##r##0 = _mm512_setzero_si512(), a##r##1 = _mm512_setzero_si512();
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5) ACC(6) ACC(7) ACC(8) ACC(9) ACC(10) ACC(11)
#undef ACC
    for (int64_t q = 0; q < nq; q++) {
        __m512i w0 = _mm512_loadu_si512((const void *)(wp + q * NR * 4));
        __m512i w1 = _mm512_loadu_si512((const void *)(wp + q * NR * 4 + 64));
        const int32_t *xr = xb + q * MR;
#define STEP(r) { __m512i a = _mm512_set1_epi32(xr[r]); \
        a##r##0 = _mm512_dpbusd_epi32(a##r##0, a, w0); a##r##1 = _mm512_dpbusd_epi32(a##r##1, a, w1); }
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7) STEP(8) STEP(9) STEP(10) STEP(11)
#undef STEP
    }
#define OUT(r) out[r][0] = a##r##0; out[r][1] = a##r##1;
    OUT(0) OUT(1) OUT(2) OUT(3) OUT(4) OUT(5) OUT(6) OUT(7) OUT(8) OUT(9) OUT(10) OUT(11)
#undef OUT
}

/* Candidates: cand [N, m] int64, the indices of the m largest int8 pre-activations of every token
 * (order unspecified), and vm [N], the m-th largest: no other latent's int8 value exceeds it.
 * Needs m <= L. */
void screen_candidates(const uint8_t *xq, const float *sx, const int8_t *Wp, const float *sw,
                       const int32_t *wsum, const float *biasp, int64_t N, int64_t L, int64_t d, int64_t m,
                       int64_t *cand, float *vm, int nthreads) {
    int64_t d4 = (d + 3) / 4 * 4, nq = d4 / 4, np = (L + NR - 1) / NR, nblk = (N + MR - 1) / MR;
    int64_t cap = 4 * m + 2 * NR;  /* compaction leaves m; a tile adds at most NR */
    #pragma omp parallel num_threads(nthreads)
    {
        float *cv = (float *)malloc(sizeof(float) * (size_t)(MR * cap + 64));
        int32_t *ci = (int32_t *)malloc(sizeof(int32_t) * (size_t)(MR * cap + 64));
        float *sv = (float *)malloc(sizeof(float) * (size_t)COMPACT_SCRATCH(cap));
        int32_t *si = (int32_t *)malloc(sizeof(int32_t) * (size_t)COMPACT_SCRATCH(cap));
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nblk; b++) {
            const int32_t *xb = (const int32_t *)xq + b * nq * MR;
            int64_t cnt[MR];
            float tau[MR], scl[MR];
            for (int r = 0; r < MR; r++) {
                cnt[r] = 0; tau[r] = -INFINITY;
                scl[r] = sx[b * MR + r < N ? b * MR + r : N - 1];
            }
            for (int64_t p = 0; p < np; p++) {
                const int8_t *wp = Wp + p * nq * NR * 4;
                __m512i acc[MR][2];
                tile_12x32(xb, wp, nq, acc);
                int64_t j0 = p * NR;
                __m512i ws0 = _mm512_loadu_si512(wsum + j0), ws1 = _mm512_loadu_si512(wsum + j0 + 16);
                __m512 sw0 = _mm512_loadu_ps(sw + j0), sw1 = _mm512_loadu_ps(sw + j0 + 16);
                __m512 b0 = _mm512_loadu_ps(biasp + j0), b1 = _mm512_loadu_ps(biasp + j0 + 16);
                __m512i idx0 = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j0),
                                                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
                __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32(16));
                for (int r = 0; r < MR; r++) {
                    __m512 s = _mm512_set1_ps(scl[r]);
                    __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][0], ws0)), _mm512_mul_ps(sw0, s), b0);
                    __m512 v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][1], ws1)), _mm512_mul_ps(sw1, s), b1);
                    __m512 t = _mm512_set1_ps(tau[r]);
                    __mmask16 k0 = _mm512_cmp_ps_mask(v0, t, _CMP_GT_OQ), k1 = _mm512_cmp_ps_mask(v1, t, _CMP_GT_OQ);
                    if (!(k0 | k1)) continue;
                    float *rv = cv + r * cap;
                    int32_t *ri = ci + r * cap;
                    int64_t n = append_lanes(rv, ri, cnt[r], k0, v0, idx0);
                    n = append_lanes(rv, ri, n, k1, v1, idx1);
                    if (n > cap - 2 * NR) tau[r] = compact(rv, ri, &n, m, sv, si);
                    cnt[r] = n;
                }
            }
            for (int r = 0; r < MR && b * MR + r < N; r++) {
                int64_t i = b * MR + r, n = cnt[r];
                float *rv = cv + r * cap;
                int32_t *ri = ci + r * cap;
                if (n > m) compact(rv, ri, &n, m, sv, si);
                float t = INFINITY;
                for (int64_t s = 0; s < n; s++) t = rv[s] < t ? rv[s] : t;
                vm[i] = n < m ? INFINITY : t;  /* n < m: NaNs, never certified */
                /* n < m only when NaNs compared false: fill with valid ids so the rescoring stays in bounds */
                for (int64_t s = 0; s < m; s++) {
                    int64_t id = s < n ? ri[s] : s;
                    cand[i * m + s] = (uint64_t)id < (uint64_t)L ? id : s;  /* never an id outside [0, L) */
                }
            }
        }
        free(cv); free(ci); free(sv); free(si);
    }
}

static inline float dot_f32(const float *a, const float *b, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    if (j < d) {
        __mmask16 t = (__mmask16)((1u << (d - j)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, a + j), _mm512_maskz_loadu_ps(t, b + j), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

#if defined(__AVX512BF16__)
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + j), (__m512bh)_mm512_loadu_si512(b + j));
    if (j < d) {
        __mmask32 t = (__mmask32)((1ull << (d - j)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(t, a + j), (__m512bh)_mm512_maskz_loadu_epi16(t, b + j));
    }
    return _mm512_reduce_add_ps(acc);
}
#else
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t d) {
    float s = 0.f;
    for (int64_t j = 0; j < d; j++) {
        uint32_t ua = (uint32_t)a[j] << 16, ub = (uint32_t)b[j] << 16;
        float fa, fb;
        memcpy(&fa, &ua, 4); memcpy(&fb, &ub, 4);
        s += fa * fb;
    }
    return s;
}
#endif

/* The exact pre-activations xs[i] . W[j] + bias[j] of every token's m candidates (fp32, or bf16
 * rows with fp32 sums), their top k, then ReLU: vals [N, k] f32, cols [N, k] int64.
 *
 * Certificate: a latent outside the candidates has an int8 value <= vm[i], so its exact value is
 * at most vm[i] + its rounding error. That error, sum_d x~_d e(w)_d + e(x)_d w~_d with per-element
 * rounding errors of spread scale / sqrt(12), has standard deviation at most
 *   sigma_i = sqrt((|x_i|^2 sw_max^2 + max_j |w_j|^2 sx_i^2) / 12)
 * (a little more with bf16 operands, whose own rounding the exact values carry).
 * A token is certified when vm[i] + z sigma_i < max(k-th exact value, 0); uncertain[i] = 1 marks
 * the others (the caller recomputes them on the dense product). Returns how many are uncertain. */
int64_t screen_rescore(const void *xs, const void *W, int is_bf16, const float *bias, const int64_t *cand,
                       int64_t N, int64_t d, int64_t m, int64_t k, const float *vm, const float *sx,
                       const float *xn2, float sw_max, float wn2_max, float z, float *vals, int64_t *cols,
                       uint8_t *uncertain, int nthreads) {
    /* per-element rounding variance in units of scale^2: int8 rounding is uniform over one step
     * (1/12); bf16 operands add a relative error of at most 2^-9 (variance 2^-18 / 3) of values up
     * to 127 steps */
    float var_unit = 1.f / 12.f + (is_bf16 ? 127.f * 127.f * ldexpf(1.f, -18) / 3.f : 0.f);
    int64_t n_unc = 0;
    #pragma omp parallel num_threads(nthreads) reduction(+:n_unc)
    {
        float *cv = (float *)malloc(sizeof(float) * (size_t)m);
        int32_t *ci = (int32_t *)malloc(sizeof(int32_t) * (size_t)m);
        float *sv = (float *)malloc(sizeof(float) * (size_t)COMPACT_SCRATCH(m));
        int32_t *si = (int32_t *)malloc(sizeof(int32_t) * (size_t)COMPACT_SCRATCH(m));
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            int nan_row = 0;
            for (int64_t s = 0; s < m; s++) {
                int64_t j = cand[i * m + s];
                float v = is_bf16 ? dot_bf16((const uint16_t *)xs + i * d, (const uint16_t *)W + j * d, d)
                                  : dot_f32((const float *)xs + i * d, (const float *)W + j * d, d);
                cv[s] = v + bias[j];
                ci[s] = (int32_t)j;
                /* NaN breaks the compaction's three-way split (and could leave ids unwritten): make
                   it -inf and send the token to the dense product, which reports it */
                if (isnan(cv[s])) { cv[s] = -INFINITY; nan_row = 1; }
            }
            int64_t n = m;
            if (k < m) compact(cv, ci, &n, k, sv, si);
            float kth = INFINITY;
            for (int64_t s = 0; s < k; s++) {
                kth = cv[s] < kth ? cv[s] : kth;
                vals[i * k + s] = cv[s] > 0.f ? cv[s] : 0.f;
                cols[i * k + s] = ci[s];
            }
            float sigma = sqrtf((xn2[i] * sw_max * sw_max + wn2_max * sx[i] * sx[i]) * var_unit);
            int ok = !nan_row && vm[i] + z * sigma < (kth > 0.f ? kth : 0.f);  /* false for NaNs too */
            uncertain[i] = (uint8_t)!ok;
            n_unc += !ok;
        }
        free(cv); free(ci); free(sv); free(si);
    }
    return n_unc;
}

#else  /* no VNNI: the Python side checks screen_int8_supported() first; these are never called */
void screen_quantize_x(const float *x, const float *mul, int64_t N, int64_t d, uint8_t *xq, float *sx, float *xn2,
                       int nthreads) {
    (void)x; (void)mul; (void)N; (void)d; (void)xq; (void)sx; (void)xn2; (void)nthreads;
}
void screen_pack_w(const float *W, const float *mul, const float *bias, int64_t L, int64_t d, int8_t *Wp, float *sw,
                   int32_t *wsum, float *biasp, float *wn2, uint16_t *Wbf, int nthreads) {
    (void)W; (void)mul; (void)bias; (void)L; (void)d; (void)Wp; (void)sw; (void)wsum; (void)biasp; (void)wn2; (void)Wbf; (void)nthreads;
}
void screen_candidates(const uint8_t *xq, const float *sx, const int8_t *Wp, const float *sw,
                       const int32_t *wsum, const float *biasp, int64_t N, int64_t L, int64_t d, int64_t m,
                       int64_t *cand, float *vm, int nthreads) {
    (void)xq; (void)sx; (void)Wp; (void)sw; (void)wsum; (void)biasp; (void)N; (void)L; (void)d; (void)m; (void)cand;
    (void)vm; (void)nthreads;
}
int64_t screen_rescore(const void *xs, const void *W, int is_bf16, const float *bias, const int64_t *cand,
                       int64_t N, int64_t d, int64_t m, int64_t k, const float *vm, const float *sx,
                       const float *xn2, float sw_max, float wn2_max, float z, float *vals, int64_t *cols,
                       uint8_t *uncertain, int nthreads) {
    (void)xs; (void)W; (void)is_bf16; (void)bias; (void)cand; (void)N; (void)d; (void)m; (void)k; (void)vm; (void)sx;
    (void)xn2; (void)sw_max; (void)wn2_max; (void)z; (void)vals; (void)cols; (void)uncertain; (void)nthreads;
    return -1;
}
#endif
