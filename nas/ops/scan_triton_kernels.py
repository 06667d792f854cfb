"""The Triton selective-scan kernels, forward and backward; launched by nas.ops.scan_triton.

One kernel family serves both entry points. Inputs are seen as G groups of Dg channels,
u/delta/z: (batch, G, Dg, L) and B/C: (batch, G, N, L), any strides; group g reads B/C row g. A single
scan with grouped B/C is G groups; the multi-direction scan is G = K directions, each with a row of an
index table that says which source position scan step s reads (-1: a pad step whose inputs read as
zero, so the state only decays there).

The shape is the CPU kernel's (csrc/scan_cpu_body.h): a program is one warp that owns a tile of
channels of one (batch, group) and walks time in order, each thread keeping its channels' states in
registers. The state tile is a [NP, KC, CL] tensor (state n, channel kc * CL + cl): Triton fills a
tensor's lanes from its last dimension. The backward's GPU tile is CL = 16 channels by KC = 2 halves over
the 32 lanes, a thread holding one channel's states; the forward, which needs half the registers, takes
CL = 32 lanes by KC = 2 channels in each thread, so a thread's loads of B_t and C_t and its per-channel
work serve two channels (at N = 32 and 64 the states take 2 and 4 lanes too; at N < 4 each thread takes 2
or 4 channels). A step loads u_t, delta_t, z_t for the tile and B_t, C_t (every thread all states' values,
the same addresses across the warp; bf16 with contiguous states as int32 pairs), and y_t = <C_t, h_t> is a
sum inside each thread: the forward exchanges nothing between lanes. The backward exchanges only dB_t and
dC_t, summed over the tile's channels by a reduce-scatter butterfly across the lanes (_add_bc), then
added by one relaxed atomic per tile and state (a plain store when one tile covers the group). One warp
per program keeps every exchange inside a warp.

The forward saves the fp32 state every T steps, in blocks of the backward's tile with each state's block
contiguous (coalesced). The backward walks those chunks in reverse: it recomputes the chunk from its
checkpoint, keeping the states after its first T - 1 steps in registers (a tuple) and each step's delta,
then runs the adjoint backwards through them (the last step's state is made once more there, and the
checkpoint read again for the first, to hold fewer registers). So each exponential is taken once forward
and twice backward. B_t and C_t are read without the step's mask (a pad reads position 0 and only meets
zeros). A, D and delta_bias gradients are per-batch partials summed on the host.

Outputs (y, du, ddelta, dz, dB, dC) are allocated token-major (channels fastest), so a step's stores
from a tile are contiguous; they are returned as views in the documented shapes. Exponentials use exp2
with A pre-scaled by log2(e). Lengths and strides do not key the compile cache (L = 196 and L = 197
share one kernel); a stride of 1 does, where the layout has it.
"""
from __future__ import annotations

import triton
import triton.language as tl

from nas.ops.scan_torch import LOG2E, SOFTPLUS_THRESHOLD

# the kernels read module globals only as constexpr
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(1.0 / LOG2E)
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)
# Sizes never key the compile cache, nor does `one` (always 1): channel offsets are multiplied by it, so
# that the compiler sees no contiguity in per-channel and per-state loads and stores and keeps them in the
# tile's own layout (states in each thread, channels across the lanes). Seeing contiguity, it lays such an
# access out its own way (Triton 3.6 even puts the states across the lanes), and every one then costs a
# trip through shared memory and, in 3.6, spills. Strides key it only by being 1 (a unit stride saves a
# multiply), never by their alignment, so a new length or batch reuses the kernel.
_SIZES = ["G", "Dg", "S", "L", "n_chunks", "one"]
_STRIDES = ["su_b", "su_g", "su_d", "su_l", "sdt_b", "sdt_g", "sdt_d", "sdt_l", "sz_b", "sz_g", "sz_d", "sz_l",
            "sB_b", "sB_g", "sB_n", "sB_l", "sC_b", "sC_g", "sC_n", "sC_l", "sdy_b", "sdy_g", "sdy_d", "sdy_l"]


@triton.jit
def _load_states(ptr, offs, step, mask, N: tl.constexpr, NP: tl.constexpr):
    """A [NP, KC, CL] tile of per-state values, state j at ptr + offs + j * step (offs [1, KC, CL]), read as one
    [1, KC, CL] load per state: such loads keep the tile's layout (states in each thread), where a single
    [NP, KC, CL] load may be laid out the compiler's way and cost a trip through shared memory. Picking a
    state by its constant index folds away. States past N are 0."""
    rows = tl.arange(0, NP)[:, None, None]
    out = tl.zeros([NP, 1, 1], dtype=tl.float32) + tl.load(ptr + offs, mask=mask, other=0.0)
    for j in tl.static_range(1, N):
        out = tl.where(rows == j, tl.load(ptr + offs + j * step, mask=mask, other=0.0), out)
    return tl.where(rows < N, out, 0.0)


@triton.jit
def _store_states(ptr, offs, step, mask, val, N: tl.constexpr, NP: tl.constexpr):
    """The inverse of _load_states: state j of `val` [NP, KC, CL] to ptr + offs + j * step, for j < N."""
    rows = tl.arange(0, NP)[:, None, None]
    for j in tl.static_range(N):
        # -0.0: the identity of +, so that the sum over the other (constant, masked) states folds away
        tl.store(ptr + offs + j * step, tl.sum(tl.where(rows == j, val, -0.0), axis=0, keep_dims=True), mask=mask)


@triton.jit
def _tile(A2_ptr, Dv_ptr, bias_ptr, G, Dg, one, N: tl.constexpr, NP: tl.constexpr, KC: tl.constexpr, CL: tl.constexpr,
          HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This program's (batch, group) and its channel tile: d [1, KC, CL] (channel within the group, times
    `one`: see _SIZES), its mask, ch (channel within the layer), the tile's A * log2(e) [NP, KC, CL], D and
    bias [1, KC, CL]."""
    bg = tl.program_id(0)
    b = (bg // G).to(tl.int64)
    g = (bg % G).to(tl.int64)
    d = tl.program_id(1) * (KC * CL) + tl.arange(0, KC)[None, :, None] * CL + tl.arange(0, CL)[None, None, :]
    mask_d = d < Dg
    d = d * one
    ch = g * Dg + d
    A2 = _load_states(A2_ptr, ch * N, 1, mask_d, N, NP)
    Dv = tl.zeros([1, KC, CL], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + ch, mask=mask_d, other=0.0)
    bias = tl.zeros([1, KC, CL], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0)
    return b, g, d, mask_d, ch, A2, Dv, bias


@triton.jit
def _ckpt_offsets(Dg, one, KC: tl.constexpr, CL: tl.constexpr, CKW: tl.constexpr, NP: tl.constexpr):
    """A checkpoint is (batch * G, n_chunks, blocks, NP, CKW) fp32: blocks of CKW channels (the backward's
    tile), each state's block contiguous. Returns this tile's offsets [1, KC, CL] in one chunk (state 0; a
    state is CKW further) and a chunk's size. Steps of the constant CKW let each state's access be an
    immediate offset; the forward's tile may span several blocks."""
    local = tl.arange(0, KC)[None, :, None] * CL + tl.arange(0, CL)[None, None, :]
    block = tl.program_id(1) * (KC * CL // CKW) + local // CKW
    return (block * (NP * CKW) + local % CKW) * one, tl.cdiv(Dg, CKW) * (NP * CKW)


@triton.jit
def _softplus(x):
    """softplus with mamba's threshold, in a form that cannot overflow; exp2 and log2 are one hardware
    instruction each (ex2/lg2.approx), where tl.log is a polynomial of some 20 instructions."""
    return tl.where(x <= _SOFTPLUS_THRESHOLD,
                    tl.maximum(x, 0.0) + _LN2 * tl.log2(1.0 + tl.exp2(-tl.abs(x) * _LOG2E)), x)


@triton.jit
def _position(s, S, g, idx_ptr, mask_d, HAS_INDEX: tl.constexpr):
    """Scan step s: its source position p (clamped to 0 on a pad), whether it is a token (not a pad, not past
    the end), whether it is inside the sequence, and the channel mask of a token step."""
    in_seq = s < S
    if HAS_INDEX:
        pos = tl.load(idx_ptr + g * S + s, mask=in_seq, other=-1)
    else:
        pos = tl.where(in_seq, s, -1)
    ok = pos >= 0
    # where, not &: the interpreter cannot `and` a tensor with a scalar
    return tl.maximum(pos, 0).to(tl.int64), ok, in_seq, tl.where(ok, mask_d, False)


@triton.jit
def _delta(dt_base, p, sdt_l, m_d, bias, in_seq, SOFTPLUS: tl.constexpr):
    """delta at source position p, biased and softplus'd (0 past the end, so the state is left alone there),
    and d delta / d (delta before softplus): sigmoid, taken as exp(x - softplus(x)), which is exact at both
    ends and 1 above the threshold."""
    x = tl.load(dt_base + p * sdt_l, mask=m_d, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(x)
        dsp = tl.exp2((x - dt) * _LOG2E)
    else:
        dt = x
        dsp = tl.full(x.shape, 1.0, tl.float32)
    return tl.where(in_seq, dt, 0.0), dsp


@triton.jit
def _state_row(base, p, s_l, rows, N: tl.constexpr, PAIRS: tl.constexpr):
    """B_t or C_t [NP, 1, 1] at source position p, fp32. Read without the step's mask: a pad reads position 0,
    which is harmless because a pad's u (and dy) read as 0, so its row only ever meets zeros. Only the states
    past N are masked, which the compiler knows per register. PAIRS: bf16 with unit state stride, `base` an
    int32 pointer: a load brings states 2j and 2j + 1, each widened to fp32 by one integer op."""
    if PAIRS:
        w = tl.load(base + p * (s_l // 2), mask=rows < N, other=0)
        return tl.where(rows % 2 == 0, w << 16, w & -65536).to(tl.float32, bitcast=True)
    else:
        return tl.load(base + p * s_l, mask=rows < N, other=0.0).to(tl.float32)


@triton.jit
def _row_base(ptr, b, g, s_b, s_g, s_n, rows, PAIRS: tl.constexpr):
    """The [NP, 1, 1] pointers of a B or C row of (batch b, group g) at position 0 (see _state_row)."""
    if PAIRS:
        return ptr.to(tl.pointer_type(tl.int32)) + (b * s_b + g * s_g) // 2 + rows // 2
    else:
        return ptr + b * s_b + g * s_g + rows * s_n


@triton.jit(do_not_specialize=_SIZES, do_not_specialize_on_alignment=_STRIDES)
def _scan_fwd_kernel(u_ptr, dt_ptr, z_ptr, y_ptr, A2_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, idx_ptr,
                     ckpt_ptr, last_ptr,
                     G, Dg, S, L, n_chunks, one,
                     su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sz_b, sz_g, sz_d, sz_l,
                     sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                     N: tl.constexpr, NP: tl.constexpr, KC: tl.constexpr, CL: tl.constexpr, T: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, BC_PAIRS: tl.constexpr, SAVE_CKPT: tl.constexpr,
                     CKW: tl.constexpr):
    """y (batch, G, L, Dg) contiguous; ckpt (batch * G, n_chunks, blocks, NP, CKW) fp32 (_ckpt_offsets); last
    (batch, G * Dg, N)."""
    b, g, d, mask_d, ch, A2, Dv, bias = _tile(A2_ptr, Dv_ptr, bias_ptr, G, Dg, one, N, NP, KC, CL, HAS_D, HAS_BIAS)
    u_base = u_ptr + b * su_b + g * su_g + d * su_d
    dt_base = dt_ptr + b * sdt_b + g * sdt_g + d * sdt_d
    z_base = z_ptr + b * sz_b + g * sz_g + d * sz_d
    rows = tl.arange(0, NP)[:, None, None]
    B_base = _row_base(B_ptr, b, g, sB_b, sB_g, sB_n, rows, BC_PAIRS)
    C_base = _row_base(C_ptr, b, g, sC_b, sC_g, sC_n, rows, BC_PAIRS)
    y_base = y_ptr + (b * G + g) * L * Dg + d
    ck_offs, ck_chunk = _ckpt_offsets(Dg, one, KC, CL, CKW, NP)
    h = tl.zeros([NP, KC, CL], dtype=tl.float32)
    for c in range(0, n_chunks):
        if SAVE_CKPT:
            _store_states(ckpt_ptr + ((b * G + g) * n_chunks + c) * ck_chunk, ck_offs, CKW, mask_d, h, N, NP)
        for t in tl.static_range(T):
            p, ok, in_seq, m_d = _position(c * T + t, S, g, idx_ptr, mask_d, HAS_INDEX)
            u = tl.load(u_base + p * su_l, mask=m_d, other=0.0).to(tl.float32)
            dt, dsp = _delta(dt_base, p, sdt_l, m_d, bias, in_seq, SOFTPLUS)
            Bt = _state_row(B_base, p, sB_l, rows, N, BC_PAIRS)
            Ct = _state_row(C_base, p, sC_l, rows, N, BC_PAIRS)
            h = tl.exp2(dt * A2) * h + (dt * u) * Bt
            y = tl.sum(h * Ct, axis=0, keep_dims=True)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zv = tl.load(z_base + p * sz_l, mask=m_d, other=0.0).to(tl.float32)
                y *= zv * tl.sigmoid(zv)
            tl.store(y_base + p * Dg, y, mask=m_d)
    _store_states(last_ptr, (b * G * Dg + ch) * N, 1, mask_d, h, N, NP)


@triton.jit
def _add_bc(row_ptr, P, ok, one, N: tl.constexpr, NP: tl.constexpr, KC: tl.constexpr, CL: tl.constexpr,
            ATOMIC: tl.constexpr):
    """Sum P [NP, KC, CL] (a step's terms of dB or dC, state by channel) over the tile's channels into the
    step's row row_ptr[0:N]: added atomically where other tiles add to the same row, else stored; nothing on a
    pad step (ok false). Masked channels contribute exact zeros.

    With the states in each thread (KC * CL = 32 lanes) and NP <= CL, the sum is a reduce-scatter across the
    CL lanes: at each lane bit k a lane keeps half its states and sends the other half to the lane that
    differs in bit k (a warp-local tl.gather, one shuffle per value sent), so 16 states over 16 lanes take
    8 + 4 + 2 + 1 shuffles, where a sum per state (tl.sum) takes 4 per state. Lane c ends with state c (lanes
    past NP only add), the two KC halves add once more across, and one store per lane of half 0 leaves."""
    if KC * CL == 32 and NP <= CL:
        c = tl.arange(0, CL)[None, None, :]
        v = P
        for k in tl.static_range(4):
            if (1 << k) < CL:
                partner = c ^ (1 << k)
                if (NP >> k) > 1:  # split: keep the states with bit k equal to this lane's, send the rest
                    lo, hi = tl.split(tl.permute(tl.reshape(v, [NP >> (k + 1), 2, KC, CL]), (0, 2, 3, 1)))
                    up = ((c >> k) & 1) == 1
                    send = tl.where(up, lo, hi)
                    v = tl.where(up, hi, lo) + tl.gather(send, tl.broadcast_to(partner, send.shape), axis=2)
                else:
                    v = v + tl.gather(v, tl.broadcast_to(partner, v.shape), axis=2)
        kc = tl.arange(0, KC)[None, :, None]
        if KC == 2:
            v = v + tl.gather(v, tl.broadcast_to(kc ^ 1, v.shape), axis=1)
        mask = tl.where(ok, (c < N) & (kc == 0), False)
        ptr = row_ptr + (c + 0 * kc) * one  # `one`: see _SIZES
        if ATOMIC:
            tl.atomic_add(ptr, v, mask=mask, sem="relaxed")
        else:
            tl.store(ptr, v, mask=mask)
    else:  # a sum over the CL lanes per state, then the KC partials
        rows = tl.arange(0, NP)[:, None, None] + 0 * tl.arange(0, KC)[None, :, None]
        mask = tl.where(ok, rows < N, False)
        part = tl.sum(P, axis=2, keep_dims=True)
        if ATOMIC:
            tl.atomic_add(row_ptr + rows, part, mask=mask, sem="relaxed")
        else:
            tl.store(row_ptr + rows, tl.sum(part, axis=1, keep_dims=True), mask=mask)


@triton.jit(do_not_specialize=_SIZES, do_not_specialize_on_alignment=_STRIDES)
def _scan_bwd_kernel(u_ptr, dt_ptr, z_ptr, dy_ptr, A2_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, idx_ptr, ckpt_ptr,
                     dlast_ptr, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                     G, Dg, S, L, n_chunks, one,
                     su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sz_b, sz_g, sz_d, sz_l,
                     sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sdy_b, sdy_g, sdy_d, sdy_l,
                     N: tl.constexpr, NP: tl.constexpr, KC: tl.constexpr, CL: tl.constexpr, T: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, BC_PAIRS: tl.constexpr,
                     HAS_DLAST: tl.constexpr, ATOMIC_BC: tl.constexpr):
    """du/ddt/dz (batch, G, L, Dg) contiguous; dB/dC (batch, G, L, N) fp32 contiguous; dA (batch, G * Dg, N),
    dD/dbias (batch, G * Dg) per-batch partials."""
    b, g, d, mask_d, ch, A2, Dv, bias = _tile(A2_ptr, Dv_ptr, bias_ptr, G, Dg, one, N, NP, KC, CL, HAS_D, HAS_BIAS)
    u_base = u_ptr + b * su_b + g * su_g + d * su_d
    dt_base = dt_ptr + b * sdt_b + g * sdt_g + d * sdt_d
    z_base = z_ptr + b * sz_b + g * sz_g + d * sz_d
    dy_base = dy_ptr + b * sdy_b + g * sdy_g + d * sdy_d
    rows = tl.arange(0, NP)[:, None, None]
    B_base = _row_base(B_ptr, b, g, sB_b, sB_g, sB_n, rows, BC_PAIRS)
    C_base = _row_base(C_ptr, b, g, sC_b, sC_g, sC_n, rows, BC_PAIRS)
    out_base = (b * G + g) * L * Dg + d  # du, ddt, dz
    bc_base = (b * G + g) * L * N  # dB, dC rows
    ck_offs, ck_chunk = _ckpt_offsets(Dg, one, KC, CL, KC * CL, NP)
    # dL/dh after the last step, carried backwards as exp(delta_{t+1} A) dL/dh_{t+1}
    carry = tl.zeros([NP, KC, CL], dtype=tl.float32)
    if HAS_DLAST:
        carry = _load_states(dlast_ptr, (b * G * Dg + ch) * N, 1, mask_d, N, NP)
    dA_acc = tl.zeros([NP, KC, CL], dtype=tl.float32)
    dD_acc = tl.zeros([1, KC, CL], dtype=tl.float32)
    dbias_acc = tl.zeros([1, KC, CL], dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        ck = ckpt_ptr + ((b * G + g) * n_chunks + c) * ck_chunk
        # the chunk forward again from its checkpoint, keeping each step's inputs and the state after it
        h = _load_states(ck, ck_offs, KC * CL, mask_d, N, NP)
        hs = ()
        dts = ()
        for t in tl.static_range(T):
            p, ok, in_seq, m_d = _position(c * T + t, S, g, idx_ptr, mask_d, HAS_INDEX)
            dt, _ = _delta(dt_base, p, sdt_l, m_d, bias, in_seq, SOFTPLUS)
            dts = dts + (dt,)
            if t < T - 1:  # the last step's state is made again in the adjoint, to keep fewer in registers
                u = tl.load(u_base + p * su_l, mask=m_d, other=0.0).to(tl.float32)
                h = tl.exp2(dt * A2) * h + (dt * u) * _state_row(B_base, p, sB_l, rows, N, BC_PAIRS)
                hs = hs + (h,)
        # the adjoint backwards through the chunk
        for t in tl.static_range(T - 1, -1, -1):
            p, ok, in_seq, m_d = _position(c * T + t, S, g, idx_ptr, mask_d, HAS_INDEX)
            u = tl.load(u_base + p * su_l, mask=m_d, other=0.0).to(tl.float32)
            dt = dts[t]
            dsp = 1.0
            if SOFTPLUS:  # d softplus(x) / dx = exp(x - softplus(x)), x read again (cheaper than holding it)
                x = tl.load(dt_base + p * sdt_l, mask=m_d, other=0.0).to(tl.float32) + bias
                dsp = tl.exp2((x - dt) * _LOG2E)  # dt = x above the threshold: 1
            Bt = _state_row(B_base, p, sB_l, rows, N, BC_PAIRS)
            Ct = _state_row(C_base, p, sC_l, rows, N, BC_PAIRS)
            gy = tl.load(dy_base + p * sdy_l, mask=m_d, other=0.0).to(tl.float32)
            if t == 0:  # the checkpoint again, not held through the chunk
                h0 = _load_states(ck, ck_offs, KC * CL, mask_d, N, NP)
            else:
                h0 = hs[t - 1]
            da = tl.exp2(dt * A2)
            dtu = dt * u
            if t == T - 1:
                h1 = da * h0 + dtu * Bt
            else:
                h1 = hs[t]
            if HAS_Z:
                zv = tl.load(z_base + p * sz_l, mask=m_d, other=0.0).to(tl.float32)
                sg = tl.sigmoid(zv)
                out = tl.sum(h1 * Ct, axis=0, keep_dims=True) + Dv * u
                tl.store(dz_ptr + out_base + p * Dg, gy * out * sg * (1.0 + zv * (1.0 - sg)), mask=m_d)
                gy = gy * zv * sg
            if HAS_D:
                dD_acc += gy * u
            # dC_t and dB_t as soon as their terms exist (shorter live ranges)
            _add_bc(dC_ptr + bc_base + p * N, h1 * gy, ok, one, N, NP, KC, CL, ATOMIC_BC)
            gh = carry + gy * Ct  # dL/dh_t
            _add_bc(dB_ptr + bc_base + p * N, gh * dtu, ok, one, N, NP, KC, CL, ATOMIC_BC)
            carry = da * gh
            q = carry * h0  # dL/d(delta_t A)
            dA_acc += q * dt
            g_dtx = tl.sum(gh * Bt, axis=0, keep_dims=True)
            ddt = (g_dtx * u + tl.sum(q * A2, axis=0, keep_dims=True) * _LN2) * dsp
            ddt = tl.where(in_seq, ddt, 0.0)  # the steps past the end (pads inside count: they decay)
            dbias_acc += ddt
            tl.store(du_ptr + out_base + p * Dg, g_dtx * dt + gy * Dv, mask=m_d)
            tl.store(ddt_ptr + out_base + p * Dg, ddt, mask=m_d)
    part = b * (G * Dg) + ch  # per-batch partials, summed on the host
    _store_states(dA_ptr, part * N, 1, mask_d, dA_acc, N, NP)
    if HAS_D:
        tl.store(dD_ptr + part, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)
