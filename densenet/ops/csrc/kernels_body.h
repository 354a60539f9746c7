/* The kernels' bodies, written once for an element type. kernels.c includes this file once per
   type, with T (the element type as stored), A (the type of the arithmetic and of the per-column
   vectors) and S (the names' suffix) defined; NAME(f) is f_S, LD and ST load an element into A
   and store one from it. The exported functions' prototypes are in kernels.h. */

void NAME(bn_relu)(long m, long c, const T *restrict x, long ldx, const A *restrict scale,
                   const A *restrict shift, T *restrict z, long ldz, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const T *xi = x + i * ldx;
        T *zi = z + i * ldz;
        for (long j = 0; j < c; j++) {
            A v = LD(xi[j]) * scale[j] + shift[j];
            zi[j] = ST(v > 0 ? v : 0);
        }
    }
}

/* Per-column mean and biased variance in one pass over memory: each thread takes blocks of 256
   rows, gets a block's mean and sum of squared deviations by two passes over the block while it
   is in cache, and merges blocks by Chan et al.'s pairwise update, all in double. */
static inline void NAME(merge)(long c, double *restrict mu, double *restrict m2, double cnt,
                               const double *restrict bmu, const double *restrict bm2, double r) {
    double tot = cnt + r;
    for (long j = 0; j < c; j++) {
        double d = bmu[j] - mu[j];
        mu[j] += d * (r / tot);
        m2[j] += bm2[j] + d * d * (cnt * r / tot);
    }
}

int NAME(col_stats_acc)(long m, long c, const T *restrict x, long ldx, double *restrict state,
                        int nt) {
    /* state = [count, mean[c], m2[c]] (m2: sum of squared deviations), merged into; left as it
       was when scratch cannot be allocated (returns 1) */
    double *part = scratch_calloc((size_t)nt * (2 * c + 1), sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *mu = part + (long)t * (2 * c + 1), *m2 = mu + c, cnt = 0;
        double *bmu = scratch_malloc(sizeof(double) * 2 * c);
        if (!bmu) {
            #pragma omp atomic write
            fail = 1;
        } else {
            double *bm2 = bmu + c;
            long hi = m * (t + 1) / n;
            for (long i0 = m * t / n; i0 < hi; i0 += 256) {
                long r = hi - i0 < 256 ? hi - i0 : 256;
                for (long j = 0; j < 2 * c; j++) bmu[j] = 0;
                for (long i = i0; i < i0 + r; i++) {
                    const T *restrict xi = x + i * ldx;
                    for (long j = 0; j < c; j++) bmu[j] += LD(xi[j]);
                }
                for (long j = 0; j < c; j++) bmu[j] /= r;
                for (long i = i0; i < i0 + r; i++) {
                    const T *restrict xi = x + i * ldx;
                    for (long j = 0; j < c; j++) { double d = LD(xi[j]) - bmu[j]; bm2[j] += d * d; }
                }
                NAME(merge)(c, mu, m2, cnt, bmu, bm2, (double)r);
                cnt += r;
            }
            free(bmu);
        }
        m2[c] = cnt;
    }
    if (fail) { free(part); return 1; }
    for (int t = 0; t < nt; t++) {
        double *p = part + (long)t * (2 * c + 1);
        if (p[2 * c] > 0) {
            NAME(merge)(c, state + 1, state + 1 + c, state[0], p, p + c, p[2 * c]);
            state[0] += p[2 * c];
        }
    }
    free(part);
    return 0;
}

void NAME(copy_cols)(long m, long c, const T *restrict src, long lds, T *restrict dst, long ldd,
                     int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const T *restrict si = src + i * lds;
        T *restrict di = dst + i * ldd;
        for (long j = 0; j < c; j++) di[j] = si[j];
    }
}

static inline void NAME(grad_rows)(long r, long c, const T *restrict x, long ldx,
                                   const T *restrict g, long ldg, const A *restrict scale,
                                   const A *restrict shift, const A *restrict mean,
                                   T *restrict dx, long lddx, int assign, T *restrict z,
                                   long ldz, A *restrict ag, A *restrict axg) {
    /* one loop with dx, one without: with the test inside, GCC vectorises the bfloat16 loop
       of neither case */
    for (long i = 0; i < r; i++) {
        const T *restrict xi = x + i * ldx, *restrict gi = g + i * ldg;
        T *restrict di = dx ? dx + i * lddx : 0, *restrict zi = z ? z + i * ldz : 0;
        if (di) {
            for (long j = 0; j < c; j++) {
                A xv = LD(xi[j]), gv = LD(gi[j]);
                A pre = xv * scale[j] + shift[j];
                A gm = pre > 0 ? gv : 0;
                ag[j] += gm;
                axg[j] += (xv - mean[j]) * gm;
                A old = assign ? 0 : LD(di[j]);
                di[j] = ST(old + gm * scale[j]);
                if (zi) zi[j] = ST(pre > 0 ? pre : 0);
            }
        } else {
            for (long j = 0; j < c; j++) {
                A xv = LD(xi[j]), gv = LD(gi[j]);
                A pre = xv * scale[j] + shift[j];
                A gm = pre > 0 ? gv : 0;
                ag[j] += gm;
                axg[j] += (xv - mean[j]) * gm;
                if (zi) zi[j] = ST(pre > 0 ? pre : 0);
            }
        }
    }
}

/* sums (2 x c) += the per-thread partial sums in part (nt x 2 x c), which it frees */
static void NAME(add_partial_sums)(long c, int nt, double *part, double *restrict sums) {
    for (long j = 0; j < c; j++) {
        double s = 0, sx = 0;
        for (int t = 0; t < nt; t++) { s += part[(long)t * 2 * c + j]; sx += part[(long)t * 2 * c + c + j]; }
        sums[j] += s;
        sums[c + j] += sx;
    }
    free(part);
}

int NAME(bn_relu_grad)(long m, long c, const T *restrict x, long ldx, const T *restrict g,
                       long ldg, const A *restrict scale, const A *restrict shift,
                       const A *restrict mean, T *restrict dx, long lddx, int assign,
                       T *restrict z, long ldz, double *restrict sums, int nt) {
    /* per thread: partial sums in A over blocks of 64 rows, added into double totals (sums is
       left as it was when scratch cannot be allocated: returns 1) */
    double *part = scratch_calloc((size_t)nt * 2 * c, sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        A *ag = scratch_malloc(sizeof(A) * 2 * c);
        if (!ag) {
            #pragma omp atomic write
            fail = 1;
        } else {
            A *axg = ag + c;
            long hi = m * (t + 1) / n;
            for (long i = m * t / n; i < hi; i += 64) {
                long r = hi - i < 64 ? hi - i : 64;
                for (long j = 0; j < 2 * c; j++) ag[j] = 0;
                NAME(grad_rows)(r, c, x + i * ldx, ldx, g + i * ldg, ldg, scale, shift, mean,
                                dx ? dx + i * lddx : 0, lddx, assign, z ? z + i * ldz : 0, ldz,
                                ag, axg);
                for (long j = 0; j < c; j++) { dg[j] += ag[j]; dxg[j] += axg[j]; }
            }
            free(ag);
        }
    }
    if (fail) { free(part); return 1; }
    NAME(add_partial_sums)(c, nt, part, sums);
    return 0;
}

void NAME(bn_grad_apply)(long m, long c, const T *restrict x, long ldx, const T *g, long ldg,
                         const A *restrict scale, const A *restrict shift,
                         const A *restrict mean, const A *restrict a, const A *restrict b,
                         T *out, long ldo, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const T *xi = x + i * ldx, *gi = g + i * ldg;
        T *oi = out + i * ldo;
        for (long j = 0; j < c; j++) {
            A xv = LD(xi[j]), gv = LD(gi[j]);
            A gm = xv * scale[j] + shift[j] > 0 ? gv : 0;
            oi[j] = ST(scale[j] * (gm - a[j] - (xv - mean[j]) * b[j]));
        }
    }
}

void NAME(col_affine_add)(long m, long c, const T *restrict x, long ldx, const A *restrict coef,
                          const A *restrict cst, const T *src, long lds, T *dst, long ldd, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (long i = 0; i < m; i++) {
        const T *xi = x + i * ldx, *si = src + i * lds;
        T *di = dst + i * ldd;
        for (long j = 0; j < c; j++) di[j] = ST(LD(si[j]) + LD(xi[j]) * coef[j] + cst[j]);
    }
}

/* Max pooling of relu(x * scale + shift) over channels-last images (n, h, w, c): since ReLU is
   monotone, the window maximum of the ReLU'd values is the ReLU of the window maximum of
   x * scale + shift, so neither the BN-ReLU output nor the pooling indices are ever stored.
   A NaN wins its window, as in PyTorch's max pooling. Parallel over output rows. */
int NAME(bn_relu_maxpool)(long n, long h, long w, long c, const T *restrict x,
                          const A *restrict scale, const A *restrict shift, long kh, long kw,
                          long sh, long sw, long ph, long pw, long oh, long ow, T *restrict out,
                          int nt) {
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        A *mx = scratch_malloc(sizeof(A) * c);
        if (!mx) {
            #pragma omp atomic write
            fail = 1;
        }
        #pragma omp for schedule(static)
        for (long r = 0; r < n * oh; r++) {
            if (!mx) continue;  /* every thread still takes part in the worksharing loop */
            long img = r / oh, oy = r % oh;
            long y0 = oy * sh - ph, y1 = y0 + kh;
            if (y0 < 0) y0 = 0;
            if (y1 > h) y1 = h;
            for (long ox = 0; ox < ow; ox++) {
                long x0 = ox * sw - pw, x1 = x0 + kw;
                if (x0 < 0) x0 = 0;
                if (x1 > w) x1 = w;
                for (long j = 0; j < c; j++) mx[j] = -INFINITY;
                for (long yy = y0; yy < y1; yy++)
                    for (long xx = x0; xx < x1; xx++) {
                        const T *restrict xi = x + ((img * h + yy) * w + xx) * c;
                        for (long j = 0; j < c; j++) {
                            A v = LD(xi[j]) * scale[j] + shift[j];
                            mx[j] = (v > mx[j] || v != v) ? v : mx[j];
                        }
                    }
                T *restrict oi = out + ((img * oh + oy) * ow + ox) * c;
                for (long j = 0; j < c; j++) oi[j] = ST((mx[j] > 0 || mx[j] != mx[j]) ? mx[j] : 0);
            }
        }
        free(mx);
    }
    return fail;
}

/* Its backward up to BN's input: g' (the pooled gradient gout routed to the first maximum of
   each window, as PyTorch routes it, and kept only where that maximum is positive - the ReLU
   mask) written to dx, all of dx (zero where nothing is routed); the column sums of g' and of
   (x - mean) * g' added to sums (double, 2 x c). Parallel over images: windows overlap within
   an image only. */
int NAME(bn_relu_maxpool_grad)(long n, long h, long w, long c, const T *restrict x,
                               const A *restrict scale, const A *restrict shift,
                               const A *restrict mean, long kh, long kw, long sh, long sw, long ph,
                               long pw, long oh, long ow, const T *restrict gout,
                               T *restrict dx, double *restrict sums, int nt) {
    double *part = scratch_calloc((size_t)nt * 2 * c, sizeof(double));
    if (!part) return 1;
    int fail = 0;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        double *dg = part + (long)t * 2 * c, *dxg = dg + c;
        A *mx = scratch_malloc(sizeof(A) * 3 * c);
        long *arg = scratch_malloc(sizeof(long) * c);
        int ok = mx && arg;
        if (!ok) {
            #pragma omp atomic write
            fail = 1;
        }
        A *ag = ok ? mx + c : 0, *axg = ok ? ag + c : 0;
        #pragma omp for schedule(static)
        for (long img = 0; img < n; img++) {
            if (!ok) continue;  /* every thread still takes part in the worksharing loop */
            const T *restrict xim = x + img * h * w * c;
            T *restrict dim = dx + img * h * w * c;
            for (long i = 0; i < h * w * c; i++) dim[i] = ST(0);
            for (long oy = 0; oy < oh; oy++) {
                long y0 = oy * sh - ph, y1 = y0 + kh;
                if (y0 < 0) y0 = 0;
                if (y1 > h) y1 = h;
                for (long j = 0; j < 2 * c; j++) ag[j] = 0;
                for (long ox = 0; ox < ow; ox++) {
                    long x0 = ox * sw - pw, x1 = x0 + kw;
                    if (x0 < 0) x0 = 0;
                    if (x1 > w) x1 = w;
                    for (long j = 0; j < c; j++) { mx[j] = -INFINITY; arg[j] = y0 * w + x0; }
                    for (long yy = y0; yy < y1; yy++)
                        for (long xx = x0; xx < x1; xx++) {
                            const T *restrict xi = xim + (yy * w + xx) * c;
                            long pos = yy * w + xx;
                            for (long j = 0; j < c; j++) {
                                A v = LD(xi[j]) * scale[j] + shift[j];
                                int take = v > mx[j] || v != v;
                                mx[j] = take ? v : mx[j];
                                arg[j] = take ? pos : arg[j];
                            }
                        }
                    const T *restrict gi = gout + ((img * oh + oy) * ow + ox) * c;
                    for (long j = 0; j < c; j++) {
                        if (mx[j] > 0) {
                            long at = arg[j] * c + j;
                            A gv = LD(gi[j]);
                            dim[at] = ST(LD(dim[at]) + gv);
                            ag[j] += gv;
                            axg[j] += (LD(xim[at]) - mean[j]) * gv;
                        }
                    }
                }
                for (long j = 0; j < c; j++) { dg[j] += ag[j]; dxg[j] += axg[j]; }
            }
        }
        free(mx);
        free(arg);
    }
    if (fail) { free(part); return 1; }
    NAME(add_partial_sums)(c, nt, part, sums);
    return 0;
}
