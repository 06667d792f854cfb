/* The causal depthwise conv1d + SiLU forward and backward for one real type, included once per type by
 * causal_conv_cpu.c with REAL, W (lanes), VEC, SIGMOIDV and NAME(x) defined.
 *
 * x, y, gy, gx: (rows = batch * C, S) contiguous; w: (C, k); bias: (C) or NULL; gw: (batch, C, k) and
 * gb: (batch, C), per batch element (the caller sums them).
 *   y[t] = silu(bias + sum_j w[j] x[t - (k - 1) + j])   (x before 0 reads as 0: F.conv1d with padding
 *   k - 1, its first S outputs)
 * Time is vectorized, W steps per vector; one work item is one row.
 */

typedef struct {
    const REAL *x, *w, *bias, *gy;
    REAL *y, *gx, *gw, *gb;
    int64_t C, S, k;
} NAME(conv_job);

static inline VEC NAME(loadu)(const REAL *p) {
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef struct {
    REAL *xp, *gp; /* a row with k - 1 zeros before it (xp) or after it (gp), zero up to the last vector */
    VEC *a;        /* the conv's output before SiLU, one vector per W steps */
    VEC *out;
} NAME(conv_scratch);

static int NAME(conv_alloc)(NAME(conv_scratch) *s, int64_t S, int64_t k) {
    int64_t nv = (S + W - 1) / W;
    size_t pad = round64((size_t)(nv * W + k) * sizeof(REAL)), vecs = round64((size_t)nv * sizeof(VEC));
    s->xp = alloc64(pad);
    s->gp = alloc64(pad);
    s->a = alloc64(vecs);
    s->out = alloc64(vecs);
    return s->xp && s->gp && s->a && s->out;
}

static void NAME(conv_free)(NAME(conv_scratch) *s) {
    free(s->xp);
    free(s->gp);
    free(s->a);
    free(s->out);
}

/* the row's conv before SiLU into s->a; leaves the padded row in s->xp */
static void NAME(conv_row)(const NAME(conv_job) *j, NAME(conv_scratch) *s, int64_t r) {
    int64_t S = j->S, k = j->k, c = r % j->C, nv = (S + W - 1) / W;
    memset(s->xp, 0, (size_t)(nv * W + k) * sizeof(REAL));
    memcpy(s->xp + k - 1, j->x + r * S, (size_t)S * sizeof(REAL));
    const REAL *w = j->w + c * k;
    REAL b = j->bias ? j->bias[c] : 0;
    for (int64_t v = 0; v < nv; v++) {
        VEC a = {0};
        a += b;
        for (int64_t i = 0; i < k; i++) a += w[i] * NAME(loadu)(s->xp + v * W + i);
        s->a[v] = a;
    }
}

static int NAME(conv_forward_range)(void *ctx, int64_t first, int64_t end) {
    const NAME(conv_job) *j = ctx;
    NAME(conv_scratch) s;
    int ok = NAME(conv_alloc)(&s, j->S, j->k);
    int64_t nv = (j->S + W - 1) / W;
    for (int64_t r = first; ok && r < end; r++) {
        NAME(conv_row)(j, &s, r);
        for (int64_t v = 0; v < nv; v++) {
            VEC e, a = s.a[v];
            s.out[v] = a * SIGMOIDV(a, &e);
        }
        memcpy(j->y + r * j->S, s.out, (size_t)j->S * sizeof(REAL));
    }
    NAME(conv_free)(&s);
    return ok ? 0 : -1;
}

static int NAME(conv_backward_range)(void *ctx, int64_t first, int64_t end) {
    const NAME(conv_job) *j = ctx;
    NAME(conv_scratch) s;
    int ok = NAME(conv_alloc)(&s, j->S, j->k);
    int64_t S = j->S, k = j->k, nv = (S + W - 1) / W;
    for (int64_t r = first; ok && r < end; r++) {
        NAME(conv_row)(j, &s, r);
        /* ga = gy * silu'(a), silu'(a) = sg (1 + a (1 - sg)); zero past S (there gy reads as 0) */
        memset(s.gp, 0, (size_t)(nv * W + k) * sizeof(REAL));
        memcpy(s.gp, j->gy + r * S, (size_t)S * sizeof(REAL));
        VEC gb = {0};
        for (int64_t v = 0; v < nv; v++) {
            VEC e, a = s.a[v], sg = SIGMOIDV(a, &e);
            VEC ga = NAME(loadu)(s.gp + v * W) * sg * ((REAL)1 + a * ((REAL)1 - sg));
            memcpy(s.gp + v * W, &ga, sizeof ga);
            gb += ga;
        }
        /* gx[t] = sum_i w[i] ga[t + k - 1 - i];  gw[i] = sum_t ga[t] x[t - (k - 1) + i] */
        int64_t c = r % j->C;
        const REAL *w = j->w + c * k;
        for (int64_t v = 0; v < nv; v++) {
            VEC g = {0};
            for (int64_t i = 0; i < k; i++) g += w[i] * NAME(loadu)(s.gp + v * W + k - 1 - i);
            s.out[v] = g;
        }
        memcpy(j->gx + r * S, s.out, (size_t)S * sizeof(REAL));
        for (int64_t i = 0; i < k; i++) {
            VEC acc = {0};
            for (int64_t v = 0; v < nv; v++) acc += NAME(loadu)(s.gp + v * W) * NAME(loadu)(s.xp + v * W + i);
            REAL sum = 0;
            for (int l = 0; l < W; l++) sum += acc[l];
            j->gw[r * k + i] = sum;
        }
        REAL sum = 0;
        for (int l = 0; l < W; l++) sum += gb[l];
        if (j->gb) j->gb[r] = sum;
    }
    NAME(conv_free)(&s);
    return ok ? 0 : -1;
}

int NAME(conv_forward)(const REAL *x, const REAL *w, const REAL *bias, REAL *y, int64_t rows, int64_t C,
                       int64_t S, int64_t k, int threads) {
    NAME(conv_job) j = {x, w, bias, NULL, y, NULL, NULL, NULL, C, S, k};
    return parallel_for(rows, threads, NAME(conv_forward_range), &j);
}

int NAME(conv_backward)(const REAL *x, const REAL *w, const REAL *bias, const REAL *gy, REAL *gx, REAL *gw,
                        REAL *gb, int64_t rows, int64_t C, int64_t S, int64_t k, int threads) {
    NAME(conv_job) j = {x, w, bias, gy, NULL, gx, gw, gb, C, S, k};
    return parallel_for(rows, threads, NAME(conv_backward_range), &j);
}
