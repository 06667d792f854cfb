/* The selective scan's forward and backward for one real type, included once per type by scan_cpu.c
 * with REAL (float or double), W (lanes per vector), VEC (W REALs), EXP2V, SIGMOIDV and SOFTPLUSV
 * (VEC functions) and NAME(x) (appends the type's suffix) defined.
 *
 * Shapes (all contiguous, row-major), with dim = G * dg channels:
 *   u, delta, z, y, gy, gu, gdelta, gz: (batch, dim, L); A: (dim, N); D, bias: (dim);
 *   B, C: (batch, G, N, L); last, g_last, gA: (batch, dim, N); gD, gbias: (batch, dim);
 *   gB, gC: (nblocks, batch, G, N, L).
 * z, D, bias, g_last may be NULL (and then gz, gD, gbias are). The forward computes
 *   dt = softplus(delta + bias) (or delta + bias), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
 *   y = (<C_t, h_t> + D u_t) * silu(z_t);
 * the backward takes gy and g_last and returns the gradient of every input: gA, gD and gbias per batch
 * element and gB, gC per channel block, which the caller sums.
 *
 * One work item is (batch element b, group g, channel block k): the channels of block k of group g,
 * W at a time in the lanes of a vector. Every item writes its own outputs only, so the result does not
 * depend on the thread count.
 */

/* State vectors on the stack up to this many (the N = 16 copy keeps them in registers), in the scratch above
 * it: the backward's three arrays of N vectors would overflow a thread's stack (512 KB on macOS) from N of
 * a few thousand. */
#ifndef STACK_STATES
#define STACK_STATES 64
#endif

typedef struct {
    const REAL *u, *delta, *A, *B, *C, *D, *z, *bias, *gy, *g_last;
    REAL *y, *last, *gu, *gdelta, *gz, *gA, *gD, *gbias, *gB, *gC;
    int64_t batch, G, dg, L, N, nblocks, block; /* block: channels per block, a multiple of W */
    int softplus;
} NAME(job);

/* (N, L) rows of B or C -> (L, N) */
static void NAME(transpose)(const REAL *src, REAL *dst, int64_t N, int64_t L) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < L; t++) dst[t * N + n] = src[n * L + t];
}

/* channels [c0, c0 + nl) of rows (dim, L) -> (L) lanes, zero past nl. Through plain REAL pointers:
 * a store into one lane of a VEC in memory can compile to a read-modify-write of the whole vector. */
static void NAME(load_lanes)(const REAL *src, int64_t L, int64_t nl, VEC *dst) {
    REAL *d = (REAL *)dst;
    int64_t t0 = 0;
#ifdef TRANSPOSE16
    if (nl == W)
        for (; t0 + W <= L; t0 += W) TRANSPOSE16(src + t0, L, d + t0 * W);
#endif
    if (nl < W) memset(dst, 0, (size_t)L * sizeof(VEC));
    for (int64_t t = t0; t < L; t++)
        for (int64_t l = 0; l < nl; l++) d[t * W + l] = src[l * L + t];
}

static void NAME(store_lanes)(const VEC *src, int64_t L, int64_t nl, REAL *dst) {
    const REAL *s = (const REAL *)src;
    int64_t t0 = 0;
#ifdef TRANSPOSE16
    REAL block[W * W];
    if (nl == W)
        for (; t0 + W <= L; t0 += W) {
            TRANSPOSE16(s + t0 * W, W, block); /* block[l * W + i] = lane l of step t0 + i */
            for (int64_t l = 0; l < W; l++) memcpy(dst + l * L + t0, block + l * W, W * sizeof(REAL));
        }
#endif
    for (int64_t l = 0; l < nl; l++)
        for (int64_t t = t0; t < L; t++) dst[l * L + t] = s[t * W + l];
}

/* nl values from src (NULL: `fill`) as one vector, zero past nl */
static VEC NAME(load_vec)(const REAL *src, int64_t nl, REAL fill) {
    VEC v = {0};
    for (int64_t l = 0; l < nl; l++) v[l] = src ? src[l] : fill;
    return v;
}

typedef struct {
    REAL *Bt, *Ct;                          /* (L, N) */
    VEC *ut, *dtt, *zt, *gyt, *spg, *o1, *o2, *o3; /* (L) lanes */
    VEC *A2, *Av;                           /* (N) lanes */
    VEC *H, *DA;                            /* (L + 1, N) states, (L, N) decays (backward) */
    VEC *gBa, *gCa;                         /* (L, N) lane-wise sums of gB, gC over the block (backward) */
    VEC *states;                            /* (3, N) h, carry, gA where N > STACK_STATES, else NULL */
} NAME(scratch);

static int NAME(scratch_alloc)(NAME(scratch) *s, int64_t L, int64_t N, int backward) {
    memset(s, 0, sizeof(*s));
    size_t ln = (size_t)(L * N);
    s->Bt = alloc64(round64(ln * sizeof(REAL)));
    s->Ct = alloc64(round64(ln * sizeof(REAL)));
    int ok = s->Bt && s->Ct;
    VEC **lanes[] = {&s->ut, &s->dtt, &s->zt, &s->gyt, &s->spg, &s->o1, &s->o2, &s->o3};
    for (int i = 0; i < 8; i++) ok = ok && (*lanes[i] = alloc64(round64((size_t)L * sizeof(VEC))));
    VEC **states[] = {&s->A2, &s->Av};
    for (int i = 0; i < 2; i++) ok = ok && (*states[i] = alloc64(round64((size_t)N * sizeof(VEC))));
    if (N > STACK_STATES) ok = ok && (s->states = alloc64(round64(3 * (size_t)N * sizeof(VEC))));
    if (backward) {
        ok = ok && (s->H = alloc64(round64((ln + (size_t)N) * sizeof(VEC))));
        VEC **big[] = {&s->DA, &s->gBa, &s->gCa};
        for (int i = 0; i < 3; i++) ok = ok && (*big[i] = alloc64(round64(ln * sizeof(VEC))));
    }
    return ok;
}

static void NAME(scratch_free)(NAME(scratch) *s) {
    void *p[] = {s->Bt, s->Ct, s->ut, s->dtt, s->zt, s->gyt, s->spg, s->o1, s->o2, s->o3,
                 s->A2, s->Av, s->H, s->DA, s->gBa, s->gCa, s->states};
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) free(p[i]);
}

/* One channel vector's inputs into lanes: u, dt = softplus(delta + bias) (its derivative in spg
 * when asked), z; A (and A log2(e)) as N lanes. Padded lanes have u = dt = 0 and A = 0, so they
 * stay zero and never decay into inf or NaN. */
static void NAME(load_channels)(const NAME(job) *j, NAME(scratch) *s, int64_t b, int64_t c0, int64_t nl,
                                int want_grad) {
    int64_t L = j->L, N = j->N, dim = j->G * j->dg;
    size_t row = (size_t)((b * dim + c0) * L);
    NAME(load_lanes)(j->u + row, L, nl, s->ut);
    NAME(load_lanes)(j->delta + row, L, nl, s->dtt);
    if (j->z) NAME(load_lanes)(j->z + row, L, nl, s->zt);
    VEC bias = NAME(load_vec)(j->bias ? j->bias + c0 : NULL, nl, 0);
    for (int64_t t = 0; t < L; t++) {
        VEC d = s->dtt[t] + bias, grad;
        if (j->softplus) {
            d = SOFTPLUSV(d, &grad);
            if (want_grad) s->spg[t] = grad;
        }
        /* padded lanes: softplus(0) would be log 2 */
        for (int64_t l = nl; l < W; l++) d[l] = 0;
        s->dtt[t] = d;
    }
    memset(s->A2, 0, (size_t)N * sizeof(VEC));
    memset(s->Av, 0, (size_t)N * sizeof(VEC));
    for (int64_t l = 0; l < nl; l++)
        for (int64_t n = 0; n < N; n++) {
            s->Av[n][l] = j->A[(c0 + l) * N + n];
            s->A2[n][l] = j->A[(c0 + l) * N + n] * (REAL)LOG2E;
        }
}

/* The item's first channel, one past its last, and the offset of its (b, g) slice of B and C. */
#define ITEM_SETUP(j, item)                                                                    \
    int64_t k = (item) % (j)->nblocks, bg = (item) / (j)->nblocks;                            \
    int64_t b = bg / (j)->G, g = bg % (j)->G, L = (j)->L, N = n_states;                      \
    int64_t dim = (j)->G * (j)->dg, ch0 = g * (j)->dg + k * (j)->block;                        \
    int64_t ch1 = g * (j)->dg + ((k + 1) * (j)->block < (j)->dg ? (k + 1) * (j)->block : (j)->dg); \
    size_t bc = (size_t)((b * (j)->G + g) * N * L)

/* n_states is j->N; a constant 16 where the caller knows it, so that the compiler unrolls the loops over
 * the state and keeps the state in registers */
static inline __attribute__((always_inline)) void NAME(forward_item_n)(const NAME(job) *j, NAME(scratch) *s,
                                                                        int64_t item, const int64_t n_states) {
    ITEM_SETUP(j, item);
    NAME(transpose)(j->B + bc, s->Bt, N, L);
    NAME(transpose)(j->C + bc, s->Ct, N, L);
    for (int64_t c0 = ch0; c0 < ch1; c0 += W) {
        int64_t nl = ch1 - c0 < W ? ch1 - c0 : W;
        NAME(load_channels)(j, s, b, c0, nl, 0);
        VEC Dv = NAME(load_vec)(j->D ? j->D + c0 : NULL, nl, 0);
        VEC h_stack[N <= STACK_STATES ? N : 1], *h = N <= STACK_STATES ? h_stack : s->states;
        memset(h, 0, (size_t)N * sizeof(VEC));
        for (int64_t t = 0; t < L; t++) {
            VEC dtv = s->dtt[t], dtx = dtv * s->ut[t], y = {0};
            const REAL *Bt = s->Bt + t * N, *Ct = s->Ct + t * N;
            for (int64_t n = 0; n < N; n++) {
                h[n] = EXP2V(dtv * s->A2[n]) * h[n] + dtx * Bt[n];
                y += h[n] * Ct[n];
            }
            y += Dv * s->ut[t];
            if (j->z) {
                VEC e, zv = s->zt[t];
                y *= zv * SIGMOIDV(zv, &e);
            }
            s->o1[t] = y;
        }
        NAME(store_lanes)(s->o1, L, nl, j->y + (size_t)((b * dim + c0) * L));
        for (int64_t l = 0; l < nl; l++)
            for (int64_t n = 0; n < N; n++) j->last[(b * dim + c0 + l) * N + n] = h[n][l];
    }
}

static inline __attribute__((always_inline)) void NAME(backward_item_n)(const NAME(job) *j, NAME(scratch) *s,
                                                                         int64_t item, const int64_t n_states) {
    ITEM_SETUP(j, item);
    NAME(transpose)(j->B + bc, s->Bt, N, L);
    NAME(transpose)(j->C + bc, s->Ct, N, L);
    memset(s->gBa, 0, (size_t)(L * N) * sizeof(VEC));
    memset(s->gCa, 0, (size_t)(L * N) * sizeof(VEC));
    for (int64_t c0 = ch0; c0 < ch1; c0 += W) {
        int64_t nl = ch1 - c0 < W ? ch1 - c0 : W;
        size_t row = (size_t)((b * dim + c0) * L);
        NAME(load_channels)(j, s, b, c0, nl, 1);
        NAME(load_lanes)(j->gy + row, L, nl, s->gyt);
        VEC Dv = NAME(load_vec)(j->D ? j->D + c0 : NULL, nl, 0);
        /* the forward again, keeping every state and decay: H[t + 1] is the state after step t;
         * with a gate, y0 = <C, h> too, into o3 */
        VEC *H = s->H, *DA = s->DA;
        memset(H, 0, (size_t)N * sizeof(VEC));
        for (int64_t t = 0; t < L; t++) {
            VEC dtv = s->dtt[t], dtx = dtv * s->ut[t], y0 = {0};
            const REAL *Bt = s->Bt + t * N, *Ct = s->Ct + t * N;
            VEC *h0 = H + t * N, *h1 = h0 + N, *da = DA + t * N;
            for (int64_t n = 0; n < N; n++) {
                da[n] = EXP2V(dtv * s->A2[n]);
                h1[n] = da[n] * h0[n] + dtx * Bt[n];
                y0 += h1[n] * Ct[n];
            }
            s->o3[t] = y0;
        }
        /* the gate: y = y1 silu(z), y1 = y0 + D u; d silu(z)/dz = sg (1 + z (1 - sg)). gyt becomes
         * the gradient of y1 (and of y0), o3 that of z. */
        VEC gDv = {0};
        for (int64_t t = 0; t < L; t++) {
            VEC gy = s->gyt[t];
            if (j->z) {
                VEC e, zv = s->zt[t], sg = SIGMOIDV(zv, &e);
                s->o3[t] = gy * (s->o3[t] + Dv * s->ut[t]) * sg * ((REAL)1 + zv * ((REAL)1 - sg));
                gy *= zv * sg;
                s->gyt[t] = gy;
            }
            gDv += gy * s->ut[t];
        }
        /* the adjoint backwards in time: carry = a_{t+1} * dL/dh_{t+1}, starting from dL/dh_{L-1} */
        VEC carry_stack[N <= STACK_STATES ? N : 1], gA_stack[N <= STACK_STATES ? N : 1], gbv = {0};
        VEC *carry = N <= STACK_STATES ? carry_stack : s->states + N;
        VEC *gA = N <= STACK_STATES ? gA_stack : s->states + 2 * N;
        memset(carry, 0, (size_t)N * sizeof(VEC));
        memset(gA, 0, (size_t)N * sizeof(VEC));
        if (j->g_last)
            for (int64_t l = 0; l < nl; l++)
                for (int64_t n = 0; n < N; n++) carry[n][l] = j->g_last[(b * dim + c0 + l) * N + n];
        for (int64_t t = L - 1; t >= 0; t--) {
            VEC dtv = s->dtt[t], uv = s->ut[t], gyv = s->gyt[t], dtx = dtv * uv;
            VEC g_dtx = {0}, g_rec = {0};
            const REAL *Bt = s->Bt + t * N, *Ct = s->Ct + t * N;
            const VEC *h0 = H + t * N, *h1 = h0 + N, *da = DA + t * N;
            VEC *gB = s->gBa + t * N, *gC = s->gCa + t * N;
            for (int64_t n = 0; n < N; n++) {
                VEC gh = carry[n] + gyv * Ct[n];   /* dL/dh_t */
                gB[n] += dtx * gh;                 /* h_t = a_t h_{t-1} + dtx B_t */
                gC[n] += gyv * h1[n];              /* y0_t = <C_t, h_t> */
                g_dtx += gh * Bt[n];
                VEC q = gh * da[n] * h0[n];        /* dL/d(dt A) */
                g_rec += q * s->Av[n];
                gA[n] += q * dtv;
                carry[n] = da[n] * gh;
            }
            s->o1[t] = g_dtx * dtv + gyv * Dv;
            VEC gd = g_dtx * uv + g_rec;
            if (j->softplus) gd *= s->spg[t];
            s->o2[t] = gd;
            gbv += gd;
        }
        NAME(store_lanes)(s->o1, L, nl, j->gu + row);
        NAME(store_lanes)(s->o2, L, nl, j->gdelta + row);
        if (j->z) NAME(store_lanes)(s->o3, L, nl, j->gz + row);
        for (int64_t l = 0; l < nl; l++) {
            for (int64_t n = 0; n < N; n++) j->gA[(b * dim + c0 + l) * N + n] = gA[n][l];
            if (j->D) j->gD[b * dim + c0 + l] = gDv[l];
            if (j->bias) j->gbias[b * dim + c0 + l] = gbv[l];
        }
    }
    /* the block's lane sums -> gB, gC[k, b, g] as (N, L) */
    size_t out = (size_t)k * (size_t)(j->batch * j->G * N * L) + bc;
    for (int64_t t = 0; t < L; t++)
        for (int64_t n = 0; n < N; n++) {
            VEC vb = s->gBa[t * N + n], vc = s->gCa[t * N + n];
            REAL sb = 0, sc = 0;
            for (int l = 0; l < W; l++) { sb += vb[l]; sc += vc[l]; }
            j->gB[out + n * L + t] = sb;
            j->gC[out + n * L + t] = sc;
        }
}

static void NAME(forward_item)(const NAME(job) *j, NAME(scratch) *s, int64_t item) {
    if (j->N == 16) NAME(forward_item_n)(j, s, item, 16);
    else NAME(forward_item_n)(j, s, item, j->N);
}

static void NAME(backward_item)(const NAME(job) *j, NAME(scratch) *s, int64_t item) {
    if (j->N == 16) NAME(backward_item_n)(j, s, item, 16);
    else NAME(backward_item_n)(j, s, item, j->N);
}

/* Items [first, end): the backward's when the job has a gradient to take (gy), else the forward's. */
static int NAME(run_range)(void *ctx, int64_t first, int64_t end) {
    const NAME(job) *j = ctx;
    int backward = j->gy != NULL;
    NAME(scratch) s;
    int ok = NAME(scratch_alloc)(&s, j->L, j->N, backward);
    for (int64_t i = first; ok && i < end; i++) {
        if (backward) NAME(backward_item)(j, &s, i);
        else NAME(forward_item)(j, &s, i);
    }
    NAME(scratch_free)(&s);
    return ok ? 0 : -1;
}

int NAME(scan_forward)(const REAL *u, const REAL *delta, const REAL *A, const REAL *B, const REAL *C,
                       const REAL *D, const REAL *z, const REAL *bias, REAL *y, REAL *last,
                       int64_t batch, int64_t G, int64_t dg, int64_t L, int64_t N, int64_t nblocks,
                       int64_t block, int softplus, int threads) {
    NAME(job) j = {u, delta, A, B, C, D, z, bias, NULL, NULL, y, last, NULL, NULL, NULL, NULL, NULL, NULL,
                   NULL, NULL, batch, G, dg, L, N, nblocks, block, softplus};
    return parallel_for(batch * G * nblocks, threads, NAME(run_range), &j);
}

int NAME(scan_backward)(const REAL *u, const REAL *delta, const REAL *A, const REAL *B, const REAL *C,
                        const REAL *D, const REAL *z, const REAL *bias, const REAL *gy, const REAL *g_last,
                        REAL *gu, REAL *gdelta, REAL *gz, REAL *gA, REAL *gD, REAL *gbias, REAL *gB,
                        REAL *gC, int64_t batch, int64_t G, int64_t dg, int64_t L, int64_t N,
                        int64_t nblocks, int64_t block, int softplus, int threads) {
    NAME(job) j = {u, delta, A, B, C, D, z, bias, gy, g_last, NULL, NULL, gu, gdelta, gz, gA, gD, gbias,
                   gB, gC, batch, G, dg, L, N, nblocks, block, softplus};
    return parallel_for(batch * G * nblocks, threads, NAME(run_range), &j);
}
