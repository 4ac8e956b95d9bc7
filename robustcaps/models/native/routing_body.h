/* EM routing's passes over the votes, for one element type T (float or double): included
 * twice by routing.c, which defines T, F(name) (the suffixed name) and NB.
 *
 * Votes V are (M, J, 16): M parents, J child slots, 16 pose elements, strides (sm, sj, 1)
 * (slot-major votes have sm = 16 and sj = M * 16). A row of 16 elements is one vector,
 * so every pass reads each vote once, straight from V, and nothing vote-sized is written
 * except the gradient. Parents are taken NB at a time, slots in order, so a slot-major
 * layout is read in contiguous runs of NB rows. Single-threaded: callers run chunks on
 * their own threads. */

typedef T F(vec) __attribute__((vector_size(16 * sizeof(T))));
typedef IDX F(ivec) __attribute__((vector_size(16 * sizeof(IDX))));
typedef T F(vecu) __attribute__((vector_size(16 * sizeof(T)), aligned(sizeof(T))));
#define VEC F(vec)
#define LD(p) ((VEC)(*(const F(vecu) *)(p)))
#define ST(p, x) (*(F(vecu) *)(p) = (x))
#ifdef __clang__
#define SHUF(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define SHUF(x, ...) __builtin_shuffle(x, (F(ivec)){__VA_ARGS__})
#endif

static inline T F(hsum)(VEC x) {  /* log2(16) shuffle-and-add steps */
    x += SHUF(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    x += SHUF(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    x += SHUF(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    x += SHUF(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return x[0];
}

/* Weighted moments of nb parents (row pointers v, weight rows r, activation rows a or
 * NULLs), about cc: a1 = sum_j w (V - cc), a2 = sum_j w (V - cc)^2 (when second),
 * ms = sum_j w, with w = r[j] (* a[j]). Slots in order, the nb parents interleaved. */
static inline void F(block_moments)(long nb, long J, long sj, const T *const *v,
                                    const T *const *r, const T *const *a, const VEC *cc,
                                    VEC *a1, VEC *a2, T *ms, int second) {
    for (long i = 0; i < nb; i++) { a1[i] = (VEC){0}; a2[i] = (VEC){0}; ms[i] = 0; }
    for (long j = 0; j < J; j++) {
        for (long i = 0; i < nb; i++) {
            T wt = a[i] ? r[i][j] * a[i][j] : r[i][j];
            VEC dv = LD(v[i] + j * sj) - cc[i];
            VEC wd = wt * dv;
            ms[i] += wt;
            a1[i] += wd;
            if (second) a2[i] += wd * dv;
        }
    }
}

/* Row pointers of the block of nb parents from m0: votes v[i] = V[m], weights r[i] = R
 * row (m / rdiv) (stride sr), activations a[i] = A row (m / adiv) or NULL. */
static inline void F(block_rows)(long m0, long nb, long J, const T *V, long sm,
                                 const T *R, long sr, long rdiv, const T *A, long adiv,
                                 const T **v, const T **r, const T **a) {
    for (long i = 0; i < nb; i++) {
        long m = m0 + i;
        v[i] = V + m * sm;
        r[i] = R + (m / rdiv) * sr;
        a[i] = A ? A + (m / adiv) * J : 0;
    }
}

/* E-step terms of nb parents, z rows out[i]:
 *   out[i][j] = (w1 . (V - cc) + w2 . (V - cc)^2 + k1) + k2
 * (the per-parent constant, then log a, added in the order of the torch path). */
static inline void F(block_estep)(long nb, long J, long sj, const T *const *v,
                                  const VEC *cc, const VEC *w1, const VEC *w2,
                                  const T *k1, const T *k2, T *const *out) {
    for (long j = 0; j < J; j++)
        for (long i = 0; i < nb; i++) {
            VEC dv = LD(v[i] + j * sj) - cc[i];
            out[i][j] = (F(hsum)(dv * (w1[i] + w2[i] * dv)) + k1[i]) + k2[i];
        }
}

/* Weighted moments about c, one parent per row of S (row stride ss):
 *   S[m, :16] = sum_j r[m,j] (V[m,j] - c[m]),  S[m, 16:] = sum_j r[m,j] (V[m,j] - c[m])^2
 * (the second half only when `second`), with r[m,j] = R[(m / rdiv) * sr + j] times
 * A[(m / adiv) * J + j] when A is given; mass[m] = sum_j r[m,j] when mass is given.
 * c: (M, 16) contiguous, or NULL for 0. */
void F(rc_moments)(const T *V, long sm, long sj, long M, long J,
                   const T *R, long sr, long rdiv, const T *A, long adiv,
                   const T *c, T *S, long ss, T *mass, int second) {
    for (long m0 = 0; m0 < M; m0 += NB) {
        long nb = M - m0 < NB ? M - m0 : NB;
        VEC a1[NB], a2[NB], cc[NB];
        T ms[NB];
        const T *r[NB], *a[NB], *v[NB];
        F(block_rows)(m0, nb, J, V, sm, R, sr, rdiv, A, adiv, v, r, a);
        for (long i = 0; i < nb; i++) cc[i] = c ? LD(c + (m0 + i) * 16) : (VEC){0};
        F(block_moments)(nb, J, sj, v, r, a, cc, a1, a2, ms, second);
        for (long i = 0; i < nb; i++) {
            ST(S + (m0 + i) * ss, a1[i]);
            if (second) ST(S + (m0 + i) * ss + 16, a2[i]);
            if (mass) mass[m0 + i] = ms[i];
        }
    }
}

/* One routing iteration (M-step, then optionally the E-step's log terms) for parents
 * taken NB at a time, so the passes over a block's votes after the first hit L2:
 * r[m,j] as in rc_moments; c0 (M, 16) the reference, or NULL for the weighted mean of the
 * votes under r (one more pass); then, for parent type m % C,
 *   mass = sum_j r, d = (S1 - eps c) / (mass + eps), q = S2 - d (2 S1 - d mass),
 *   var = max(q, 0) / (mass + eps) + vfloor, sls = 0.5 sum_h log var,
 *   logit = lam (ba - (buh + sls) mass / ds)                        (Procedure 1's M-step
 * on centred moments; a parent whose mean is more than sqrt(ratio) sigma from a given c0
 * is recomputed about c0 + d, for float32 precision). With z, the E-step terms:
 *   w = [d / var, -0.5 / var], k = -0.5 sum_h d^2 / var - sls - 0.5 H log(2 pi),
 *   z[m, j] = (w . [V - c, (V - c)^2] + k) + logsigmoid(logit).
 * Outputs, contiguous per parent: c (M,16) the reference used, S (M,32), mass (M), d, var,
 * q (M,16), sls, logit (M); w (M,32) and z (M,J) when z is not NULL.
 * Mean smoothing (alpha != 1, routing preset "authors-smooth", capsule_em/em_layers.py):
 * the centre is alpha * mean + (1 - alpha) * prev (prev (M,16) the previous iteration's
 * centre, NULL for 0), and d, q, var and the E-step are about that centre:
 *   d = alpha (S1 - eps c) / (mass + eps) + (1 - alpha) (prev - c). */
void F(rc_iteration)(const T *V, long sm, long sj, long M, long J,
                     const T *R, long sr, long rdiv, const T *A, long adiv,
                     const T *c0, long C, const T *ba, const T *buh,
                     double lam, double ds, double vfloor, double eps, double ratio,
                     T *c, T *S, T *mass, T *d, T *var, T *q, T *sls, T *logit, T *w,
                     T *z, const T *prev, double alpha) {
    const T epsT = (T)eps, flo = (T)vfloor, half_log_2pi = (T)(8.0 * LOG_2PI);
    for (long m0 = 0; m0 < M; m0 += NB) {
        long nb = M - m0 < NB ? M - m0 : NB;
        VEC a1[NB], a2[NB], cc[NB], dd[NB], vv[NB], qq[NB];
        T ms[NB];
        const T *r[NB], *a[NB], *v[NB];
        F(block_rows)(m0, nb, J, V, sm, R, sr, rdiv, A, adiv, v, r, a);
        for (long i = 0; i < nb; i++) cc[i] = c0 ? LD(c0 + (m0 + i) * 16) : (VEC){0};
        if (!c0) {
            F(block_moments)(nb, J, sj, v, r, a, cc, a1, a2, ms, 0);
            for (long i = 0; i < nb; i++) cc[i] = a1[i] / (ms[i] + epsT);
        }
        for (int pass = 0; pass < 2; pass++) {
            F(block_moments)(nb, J, sj, v, r, a, cc, a1, a2, ms, 1);
            int far = 0, moved[NB];
            for (long i = 0; i < nb; i++) {
                T den = ms[i] + epsT;
                dd[i] = (a1[i] - epsT * cc[i]) / den;
                if (alpha != 1.0) {
                    VEC pv = prev ? LD(prev + (m0 + i) * 16) : (VEC){0};
                    dd[i] = (T)alpha * dd[i] + (T)(1.0 - alpha) * (pv - cc[i]);
                }
                qq[i] = a2[i] - dd[i] * (2 * a1[i] - dd[i] * ms[i]);
                VEC qc = qq[i];
                for (int h = 0; h < 16; h++) qc[h] = qc[h] > 0 ? qc[h] : 0;
                vv[i] = qc / den + flo;
                moved[i] = 0;
                if (c0 && !pass) {
                    VEC ratio_v = dd[i] * dd[i] / vv[i];
                    for (int h = 0; h < 16; h++) moved[i] |= ratio_v[h] > (T)ratio;
                    far |= moved[i];
                }
            }
            if (!far) break;
            for (long i = 0; i < nb; i++)  /* re-centre only the parents that moved far */
                if (moved[i]) cc[i] += dd[i];
        }
        for (long i = 0; i < nb; i++) {
            long m = m0 + i, type = m % C;
            T s = 0;
            for (int h = 0; h < 16; h++) s += LOGT(vv[i][h]);
            s *= (T)0.5;
            T lg = (T)lam * (ba[type] - (buh[type] + s) * (ms[i] / (T)ds));
            ST(c + m * 16, cc[i]);
            ST(S + m * 32, a1[i]);
            ST(S + m * 32 + 16, a2[i]);
            ST(d + m * 16, dd[i]);
            ST(var + m * 16, vv[i]);
            ST(q + m * 16, qq[i]);
            mass[m] = ms[i];
            sls[m] = s;
            logit[m] = lg;
        }
        if (!z) continue;
        VEC w1[NB], w2[NB];
        T k1[NB], k2[NB], *out[NB];
        for (long i = 0; i < nb; i++) {
            long m = m0 + i;
            VEC inv = 1 / vv[i];
            w1[i] = dd[i] * inv;
            w2[i] = (T)-0.5 * inv;
            ST(w + m * 32, w1[i]);
            ST(w + m * 32 + 16, w2[i]);
            k1[i] = (T)-0.5 * F(hsum)(dd[i] * dd[i] * inv) - sls[m] - half_log_2pi;
            T x = logit[m];  /* logsigmoid, stable */
            k2[i] = (x < 0 ? x : 0) - LOG1PT(EXPT(-(x < 0 ? -x : x)));
            out[i] = z + m * J;
        }
        F(block_estep)(nb, J, sj, v, cc, w1, w2, k1, k2, out);
    }
}

/* Log-density-like products, one row of z per parent (row stride sz):
 *   z[m, j] = (w[m,:16] . (V[m,j] - c[m]) + w[m,16:] . (V[m,j] - c[m])^2 + add[m]) + add2[m]
 * w: (M, 32) with row stride sw; c: (M, 16) contiguous; add, add2: (M,) or NULL. */
void F(rc_estep)(const T *V, long sm, long sj, long M, long J, const T *c,
                 const T *w, long sw, const T *add, const T *add2, T *z, long sz) {
    for (long m0 = 0; m0 < M; m0 += NB) {
        long nb = M - m0 < NB ? M - m0 : NB;
        VEC cc[NB], w1[NB], w2[NB];
        T ad[NB], ad2[NB];
        const T *v[NB];
        T *out[NB];
        for (long i = 0; i < nb; i++) {
            long m = m0 + i;
            cc[i] = LD(c + m * 16); w1[i] = LD(w + m * sw); w2[i] = LD(w + m * sw + 16);
            ad[i] = add ? add[m] : 0;
            ad2[i] = add2 ? add2[m] : 0;
            v[i] = V + m * sm;
            out[i] = z + m * sz;
        }
        F(block_estep)(nb, J, sj, v, cc, w1, w2, ad, ad2, out);
    }
}

/* Gradient of the votes from K products with centred moments (the backward of
 * rc_moments and rc_estep over U = [V - c_k, (V - c_k)^2]):
 *   G[m, j] = sum_k L[m,k,j] (P[m,k,:16] + 2 (V[m,j] - cs[m,k]) P[m,k,16:])
 * L: (M, K, J), P: (M, K, 32), cs: (M, K, 16), all contiguous; G: strides (gm, gj, 1).
 * `accumulate`: add to G instead of overwriting it. */
void F(rc_vgrad)(const T *V, long sm, long sj, long M, long J, long K,
                 const T *L, const T *P, const T *cs, T *G, long gm, long gj,
                 int accumulate) {
    enum { KB = 8 };  /* products per sweep (K = 2T - 1: one sweep up to T = 4); NB * KB * 3 vectors in L1 */
    for (long k0 = 0; k0 < K; k0 += KB) {
        long nk = K - k0 < KB ? K - k0 : KB;
        int acc = accumulate || k0 > 0;
        for (long m0 = 0; m0 < M; m0 += NB) {
            long nb = M - m0 < NB ? M - m0 : NB;
            VEC p1[NB][KB], p2[NB][KB], cc[NB][KB];
            const T *l[NB], *v[NB];
            T *g[NB];
            for (long i = 0; i < nb; i++) {
                long m = m0 + i;
                for (long k = 0; k < nk; k++) {
                    const T *p = P + (m * K + k0 + k) * 32;
                    p1[i][k] = LD(p);
                    p2[i][k] = 2 * LD(p + 16);
                    cc[i][k] = LD(cs + (m * K + k0 + k) * 16);
                }
                l[i] = L + (m * K + k0) * J;
                v[i] = V + m * sm;
                g[i] = G + m * gm;
            }
            for (long j = 0; j < J; j++)
                for (long i = 0; i < nb; i++) {
                    VEC x = LD(v[i] + j * sj), s = acc ? LD(g[i] + j * gj) : (VEC){0};
                    for (long k = 0; k < nk; k++)
                        s += l[i][k * J + j] * (p1[i][k] + (x - cc[i][k]) * p2[i][k]);
                    ST(g[i] + j * gj, s);
                }
        }
    }
}

/* Per-type E-step normaliser (routing preset "authors"), in place, in two stages with a
 * vectorised exp between them (a scalar exp here cost 2x the rest): z rows are parents
 * m = (s L + l) C + c (row stride sz), each row J = KK * B slots (kernel offset kk, child
 * type b innermost); idx[l KK + kk] is the child position of slot (l, kk). For every
 * sample s, parent type c, child position p and child type b, the slots holding that
 * child for that type form a group.
 *   stage 0: z -= the group's max  (so exp(z) <= 1 and each group's sum >= 1; the shift
 *            cancels exactly)
 *   stage 1: z /= the group's sum  (z holding exp(z - max) by then)
 * work: C n_pos B scratch elements. */
void F(rc_norm_type)(T *z, long sz, long n, long L, long C, long KK, long B,
                     const long long *idx, long n_pos, T *work, int stage) {
    long G = C * n_pos * B;
    const T init = stage ? (T)0 : -(T)INFINITY;
    for (long s = 0; s < n; s++) {
        for (long g = 0; g < G; g++) work[g] = init;
        for (long l = 0; l < L; l++)
            for (long c = 0; c < C; c++) {
                const T *row = z + ((s * L + l) * C + c) * sz;
                for (long kk = 0; kk < KK; kk++) {
                    T *grp = work + (c * n_pos + idx[l * KK + kk]) * B;
                    const T *x = row + kk * B;
                    if (stage)
                        for (long b = 0; b < B; b++) grp[b] += x[b];
                    else
                        for (long b = 0; b < B; b++) grp[b] = x[b] > grp[b] ? x[b] : grp[b];
                }
            }
        for (long l = 0; l < L; l++)
            for (long c = 0; c < C; c++) {
                T *row = z + ((s * L + l) * C + c) * sz;
                for (long kk = 0; kk < KK; kk++) {
                    const T *grp = work + (c * n_pos + idx[l * KK + kk]) * B;
                    T *x = row + kk * B;
                    if (stage)
                        for (long b = 0; b < B; b++) x[b] /= grp[b];
                    else
                        for (long b = 0; b < B; b++) x[b] -= grp[b];
                }
            }
    }
}

/* Backward of rc_norm_type: out = R (gR - sum_group R gR), the groups as there.
 * gR, R: rows of stride sr; out: rows of stride so (may be neither). work: C n_pos B. */
void F(rc_norm_type_grad)(const T *gR, const T *R, long sr, T *out, long so, long n, long L,
                          long C, long KK, long B, const long long *idx, long n_pos,
                          T *work) {
    long G = C * n_pos * B;
    for (long s = 0; s < n; s++) {
        for (long g = 0; g < G; g++) work[g] = 0;
        for (long l = 0; l < L; l++)
            for (long c = 0; c < C; c++) {
                long m = (s * L + l) * C + c;
                const T *gr = gR + m * sr, *r = R + m * sr;
                for (long kk = 0; kk < KK; kk++) {
                    T *acc = work + (c * n_pos + idx[l * KK + kk]) * B;
                    for (long b = 0; b < B; b++) acc[b] += r[kk * B + b] * gr[kk * B + b];
                }
            }
        for (long l = 0; l < L; l++)
            for (long c = 0; c < C; c++) {
                long m = (s * L + l) * C + c;
                const T *gr = gR + m * sr, *r = R + m * sr;
                T *o = out + m * so;
                for (long kk = 0; kk < KK; kk++) {
                    const T *acc = work + (c * n_pos + idx[l * KK + kk]) * B;
                    for (long b = 0; b < B; b++)
                        o[kk * B + b] = r[kk * B + b] * (gr[kk * B + b] - acc[b]);
                }
            }
    }
}

#undef SHUF
#undef VEC
#undef LD
#undef ST
