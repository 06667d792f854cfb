"""Triton selective scan: forward and backward, one launch for all directions (groups) of a layer.

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

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from nas.errors import UserError
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


def _tile_shape(block_d: int, NP: int) -> tuple[int, int]:
    """(KC, CL) of a BLOCK_D-channel tile [NP, KC, CL]: CL = 16 channels across lanes (8 past NP = 32), the
    KC axis across the lanes left (2 at NP <= 16, then in each thread), the states in each thread (across
    NP / 16 lanes past NP = 16)."""
    cl = min(block_d, 16 // max(1, NP // 32))
    return block_d // cl, cl


def forward_tile(block_d: int, NP: int) -> tuple[int, int]:
    """(KC, CL) of the forward's tile. Where the backward's is the GPU's 2 x 16 lanes with the states in each
    thread, the forward (which needs half the registers) gives each thread two channels across all 32 lanes:
    a thread's B_t and C_t loads and per-channel work then serve two channels. Else the backward's."""
    kc, cl = _tile_shape(block_d, NP)
    return (2, 32) if (kc, cl) == (2, 16) and NP <= 16 else (kc, cl)


def backward_maxnreg(NP: int, io_dtype: torch.dtype) -> int | None:
    """The backward's register cap at d_state 9-16 (the compiler would take all 255): 224 with 16-bit inputs,
    which leaves room for 9 warps an SM where 255 leaves 8, and 232 with fp32 inputs (224 spills there with the
    pinned Triton), both without spilling (benchmarks/kernel_resources.py). Other sizes are left uncapped."""
    if NP != 16:
        return None
    return 232 if io_dtype == torch.float32 else 224


def launch_config(Dg: int, N: int, S: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_D, T): the backward's channels per program (one warp; the forward's tile may be wider, see
    forward_tile) and steps per checkpoint, from the shape alone (no autotuning, so a new length or batch
    never compiles again). Up to 16 states a thread (up to 4 channels a thread at N < 4), and T = 4 (2 past
    N = 16): at d_state 16 the backward then compiles for sm_90 within its 224-register cap without
    spilling, where T = 8 spills (benchmarks/kernel_resources.py)."""
    NP = triton.next_power_of_2(N)
    if interpret:  # a numpy call per tensor op and program: few programs, tiles no wider than the channels
        return min(32, triton.next_power_of_2(Dg)), 4
    lanes = 32 // max(1, NP // 16)  # channel lanes
    block_d = lanes * max(1, 4 // NP)
    return min(block_d, max(triton.next_power_of_2(Dg), lanes)), 4 if NP <= 16 else 2


def _strides4(t):
    return [t.stride(i) for i in range(4)]


def _bc_pairs(B, C) -> bool:
    """Whether the kernels may read B and C (batch, G, N, L) as int32 pairs of bf16 states: bf16, N even, the
    states contiguous, every other stride even and both tensors 4-byte aligned (the models' channel-fastest
    B and C are)."""
    return all(t.dtype == torch.bfloat16 and t.shape[2] % 2 == 0 and t.stride(2) == 1
               and t.storage_offset() % 2 == 0  # allocations are aligned: an even offset is 4-byte aligned
               and all(t.stride(i) % 2 == 0 for i in (0, 1, 3)) for t in (B, C))


def _token_major(batch, G, Dg, L, device, dtype, zero):
    """A (batch, G, Dg, L) tensor stored as (batch, G, L, Dg): a step's channels are contiguous."""
    return (torch.zeros if zero else torch.empty)((batch, G, L, Dg), device=device, dtype=dtype).transpose(2, 3)


# Under TRITON_INTERPRET=1 the kernels are Python functions that torch cannot put in a graph: the ops are then
# opaque custom ops, whose fake implementation is their body with the launches skipped.
_INTERPRETED = not isinstance(_scan_fwd_kernel, triton.runtime.JITFunction)


def _register(name: str):
    """torch.library.triton_op(name), whose body torch.compile traces and whose launches Inductor sees; an
    opaque custom op under the interpreter."""
    def register(fn):
        if not _INTERPRETED:
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op
    return register


def _launch(kernel, grid, *args, maxnreg=None, **kwargs):
    """Launch through torch.library.wrap_triton, so that torch.compile and export see the kernel (skipped
    under fake tensors when interpreted: see _register). A traced launch takes only the options torch knows
    (num_warps): FMA fusion and `maxnreg` (a register cap) apply to eager launches."""
    traced = is_fake(args[0])
    if _INTERPRETED and traced:
        return
    if not traced:  # FMA fusion stated, not left to Triton's default (which turns off in 3.10, and warns until then)
        kwargs["enable_fp_fusion"] = True
        if maxnreg:
            kwargs["maxnreg"] = maxnreg
    # the launch goes to the tensors' GPU, whichever device is current
    with torch.cuda.device(args[0].device) if args[0].device.type == "cuda" else contextlib.nullcontext():
        wrap_triton(kernel)[grid](*args, **kwargs, num_warps=1)


@_register("nas::selective_scan_triton")
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, Dv: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], softplus: bool, index: Optional[Tensor], S: int, block_d: int, T: int,
              save_ckpt: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped scan over u/delta/z (batch, G, Dg, L) and B/C (batch, G, N, L) views, with an optional (G, S)
    index table. Returns y (batch, G, Dg, L) (a view of token-major memory), the last state (batch, G * Dg, N)
    fp32, and the fp32 checkpoints the backward reads (one element when save_ckpt is false)."""
    batch, G, Dg, L = u.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(N)
    kc, cl = forward_tile(block_d, NP)
    n_chunks, tiles = triton.cdiv(S, T), triton.cdiv(Dg, kc * cl)
    A2 = (A.float() * LOG2E).contiguous()
    Dv32 = None if Dv is None else Dv.float().contiguous()
    bias32 = None if delta_bias is None else delta_bias.float().contiguous()
    y = _token_major(batch, G, Dg, L, u.device, u.dtype, zero=index is not None)
    ckpt = torch.empty((batch * G * n_chunks * triton.cdiv(Dg, block_d) * NP * block_d) if save_ckpt else 1,
                       device=u.device, dtype=torch.float32)
    last = torch.empty((batch, G * Dg, N), device=u.device, dtype=torch.float32)
    dummy = A2
    _launch(_scan_fwd_kernel, (batch * G, tiles),
            u, delta, z if z is not None else dummy, y, A2, B, C, Dv32 if Dv32 is not None else dummy,
            bias32 if bias32 is not None else dummy, index if index is not None else dummy, ckpt, last,
            G, Dg, S, L, n_chunks, 1, *_strides4(u), *_strides4(delta),
            *(_strides4(z) if z is not None else [0] * 4), *_strides4(B), *_strides4(C),
            N=N, NP=NP, KC=kc, CL=cl, T=T, HAS_D=Dv is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_INDEX=index is not None,
            BC_PAIRS=_bc_pairs(B, C), SAVE_CKPT=save_ckpt, CKW=block_d)
    return y, last, ckpt


@_register("nas::selective_scan_triton_backward")
def _scan_bwd(dy: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              Dv: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool,
              index: Optional[Tensor], S: int, block_d: int, T: int, ckpt: Tensor) -> list[Tensor]:
    """Gradients of _scan_fwd's inputs: du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (an empty tensor for an
    absent option), in the inputs' shapes and dtypes; du/ddelta/dz are views of token-major memory."""
    batch, G, Dg, L = u.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(N)
    kc, cl = _tile_shape(block_d, NP)
    n_chunks, tiles = triton.cdiv(S, T), triton.cdiv(Dg, block_d)
    dev = u.device
    A2 = (A.float() * LOG2E).contiguous()
    Dv32 = None if Dv is None else Dv.float().contiguous()
    bias32 = None if delta_bias is None else delta_bias.float().contiguous()
    zero = index is not None  # positions no step visits get zero gradients
    du = _token_major(batch, G, Dg, L, dev, u.dtype, zero)
    ddt = _token_major(batch, G, Dg, L, dev, delta.dtype, zero)
    dz = _token_major(batch, G, Dg, L, dev, z.dtype, zero) if z is not None else None
    dB = torch.zeros((batch, G, L, N), device=dev, dtype=torch.float32)
    dC = torch.zeros((batch, G, L, N), device=dev, dtype=torch.float32)
    dA = torch.empty((batch, G * Dg, N), device=dev, dtype=torch.float32)
    dD = torch.empty((batch, G * Dg), device=dev, dtype=torch.float32) if Dv32 is not None else None
    dbias = torch.empty((batch, G * Dg), device=dev, dtype=torch.float32) if bias32 is not None else None
    dummy = A2
    _launch(_scan_bwd_kernel, (batch * G, tiles),
            u, delta, z if z is not None else dummy, dy, A2, B, C, Dv32 if Dv32 is not None else dummy,
            bias32 if bias32 is not None else dummy, index if index is not None else dummy, ckpt,
            dummy if dlast is None else dlast.contiguous(), du, ddt, dz if dz is not None else dummy, dB, dC, dA,
            dD if dD is not None else dummy, dbias if dbias is not None else dummy,
            G, Dg, S, L, n_chunks, 1, *_strides4(u), *_strides4(delta),
            *(_strides4(z) if z is not None else [0] * 4), *_strides4(B), *_strides4(C), *_strides4(dy),
            N=N, NP=NP, KC=kc, CL=cl, T=T, HAS_D=Dv32 is not None, HAS_Z=z is not None,
            HAS_BIAS=bias32 is not None, SOFTPLUS=softplus, HAS_INDEX=index is not None,
            BC_PAIRS=_bc_pairs(B, C), HAS_DLAST=dlast is not None, ATOMIC_BC=tiles > 1,
            maxnreg=backward_maxnreg(NP, u.dtype))
    return [du, ddt, dA.sum(0).to(A.dtype), dB.transpose(2, 3).to(B.dtype), dC.transpose(2, 3).to(C.dtype),
            dD.sum(0).to(Dv.dtype) if dD is not None else A.new_empty(0), dz if dz is not None else A.new_empty(0),
            dbias.sum(0).to(delta_bias.dtype) if dbias is not None else A.new_empty(0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, Dv, z, delta_bias, softplus, index, S, block_d, T, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, Dv, z, delta_bias, index, output[2])
    ctx.meta = (softplus, S, block_d, T)


def _backward(ctx, dy, dlast, _):
    u, delta, A, B, C, Dv, z, delta_bias, index, ckpt = ctx.saved_tensors
    softplus, S, block_d, T = ctx.meta
    if dy is None:  # only the last state was used
        dy = torch.zeros_like(u)
    du, ddt, dA, dB, dC, dD, dz, dbias = _scan_bwd(dy, dlast, u, delta, A, B, C, Dv, z, delta_bias, softplus, index,
                                                   S, block_d, T, ckpt)
    return (du, ddt, dA, dB, dC, dD if Dv is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None, None, None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _grouped_scan(u, delta, A, B, C, Dv, z, delta_bias, softplus, index, S, config):
    """_scan_fwd at `config` (BLOCK_D, T), or the shape's launch config; checkpoints only where a gradient can
    flow. Returns (y, last state)."""
    block_d, T = config or launch_config(u.shape[2], A.shape[1], S, u.device.type == "cpu")
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, Dv, z, delta_bias))
    y, last, _ = _scan_fwd(u, delta, A, B, C, Dv, z, delta_bias, bool(softplus), index, S, block_d, T, save)
    return y, last


def _check_n(N: int) -> None:
    if N > 64:
        raise UserError(f"A: the triton backend supports d_state N <= 64, got N = {N}; use backend='torch'")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, config=None):
    """`selective_scan` on the Triton kernels. Shapes as in `nas.ops.selective_scan` (already checked).
    y comes back as a (batch, D, L) view of token-major memory.

    config: optional (BLOCK_D, T) override, for benchmarks and tests.
    """
    batch, dim, L = u.shape
    _check_n(A.shape[1])
    G = 1 if B.dim() == 3 else B.shape[1]
    Dg = dim // G
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    u4, dt4 = u.unflatten(1, (G, Dg)), delta.unflatten(1, (G, Dg))
    z4 = None if z is None else z.unflatten(1, (G, Dg))
    y, last = _grouped_scan(u4, dt4, A, B4, C4, D, z4, delta_bias, delta_softplus, None, L, config)
    y = y.flatten(1, 2)
    return (y, last) if return_last_state else y


def multi_direction_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                index=None, config=None):
    """`multi_direction_scan` in one launch: K directions as K groups, tokens read via `index`.
    y comes back as a (batch, K, D, L) view of token-major (batch, K, L, D) memory."""
    batch, K, dim, L = u.shape
    _check_n(A.shape[2])
    S = L if index is None else index.shape[1]
    idx = None if index is None else index.to(torch.int32).contiguous()
    y, _ = _grouped_scan(u, delta, A.reshape(K * dim, -1), B, C, None if D is None else D.reshape(-1), z,
                         None if delta_bias is None else delta_bias.reshape(-1), delta_softplus, idx, S, config)
    return y
