"""Triton selective scan: forward and backward, one launch for all directions (groups) of a layer.

One kernel family serves both entry points. Inputs are seen as G groups of Dg channels,
u/delta/z/y: (batch, G, Dg, L) and B/C: (batch, G, N, L); group g reads B/C row g. A single scan with
grouped B/C is G groups; the multi-direction scan is G = K directions, each with a row of an index
table that says which source position scan step s reads (-1: a pad step whose inputs read as zero).

A program owns a [BLOCK_D x N] fp32 state tile of one (batch, group) and walks the sequence in chunks
of T steps. Inside a chunk the states come from an associative scan over (decay, input) pairs along
the time axis, so every input is loaded once per chunk as a [BLOCK_D, T] / [N, T] tile and no
per-step loop runs in Python or in the kernel. The forward saves the state at every chunk boundary;
the backward walks the chunks in reverse, recomputes the chunk's states from its checkpoint, and gets
the adjoint g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} from a second (reverse) associative scan.
B/C gradients are reduced over the tile's channels before any atomic add; A, D and delta_bias
gradients are written as per-batch partials and summed on the host (no atomics).

Exponentials use exp2 with A pre-scaled by log2(e). Lengths and strides are not specialized, so
L = 196 and L = 197 share one compiled kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nas.errors import UserError
from nas.ops.scan_torch import LOG2E, SOFTPLUS_THRESHOLD

# the kernels read module globals only as constexpr
_LOG2E = tl.constexpr(LOG2E)
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)
_NOSPEC = ["S", "L", "n_chunks", "Dg", "G",
           "su_b", "su_g", "su_d", "su_l", "sdt_b", "sdt_g", "sdt_d", "sdt_l",
           "sz_b", "sz_g", "sz_d", "sz_l", "sB_b", "sB_g", "sB_n", "sB_l", "sC_b", "sC_g", "sC_n", "sC_l"]


@triton.jit
def _combine_states(a_prev, b_prev, a_cur, b_cur):
    # h = a_cur * (a_prev * h0 + b_prev) + b_cur
    return a_prev * a_cur, a_cur * b_prev + b_cur


@triton.jit
def _combine_adjoint(alpha_prev, b_prev, q_prev, alpha_cur, b_cur, q_cur):
    # Reverse time: a segment summary says g = b + q * (alpha_before * g_before), where alpha_before is
    # the decay of the step just after the segment. `prev` is the later (already scanned) segment.
    t = q_cur * alpha_prev
    return alpha_cur, b_cur + t * b_prev, t * q_prev


@triton.jit
def _program_tile(A2_ptr, Dv_ptr, bias_ptr, G, Dg, N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This program's (batch, group), its channel tile, and the per-channel parameters of that tile."""
    b = (tl.program_id(1) // G).to(tl.int64)
    g = (tl.program_id(1) % G).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dg
    ch = g * Dg + offs_d
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A2_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(Dv_ptr + ch, mask=mask_d, other=0.0)
    return b, g, offs_d, mask_d, ch, offs_n, mask_n, mask_dn, A2, bias, Dv


@triton.jit
def _load_chunk(c, b, g, offs_d, mask_d, offs_n, mask_n, A2, bias,
                u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, S,
                su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l,
                sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, T: tl.constexpr):
    """Load chunk c and build its decays. Returns position info, inputs and [BLOCK_D, N, T] tiles."""
    s = c * T + tl.arange(0, T)
    in_seq = s < S
    if HAS_INDEX:
        pos = tl.load(idx_ptr + g * S + s, mask=in_seq, other=-1)
    else:
        pos = tl.where(in_seq, s, -1)
    ok = pos >= 0
    pos = tl.where(ok, pos, 0).to(tl.int64)
    m_dt = mask_d[:, None] & ok[None, :]
    u = tl.load(u_ptr + b * su_b + g * su_g + offs_d[:, None] * su_d + pos[None, :] * su_l,
                mask=m_dt, other=0.0).to(tl.float32)
    dt_raw = tl.load(dt_ptr + b * sdt_b + g * sdt_g + offs_d[:, None] * sdt_d + pos[None, :] * sdt_l,
                     mask=m_dt, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt_raw += bias[:, None]
    if SOFTPLUS:
        # softplus with mamba's threshold, in a form that cannot overflow
        dt = tl.where(dt_raw <= _SOFTPLUS_THRESHOLD, tl.maximum(dt_raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt_raw))), dt_raw)
    else:
        dt = dt_raw
    # Steps past the end of the sequence must leave the state alone (decay 1, no input).
    dt = tl.where(in_seq[None, :], dt, 0.0)
    m_nt = mask_n[:, None] & ok[None, :]
    Bt = tl.load(B_ptr + b * sB_b + g * sB_g + offs_n[:, None] * sB_n + pos[None, :] * sB_l,
                 mask=m_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * sC_b + g * sC_g + offs_n[:, None] * sC_n + pos[None, :] * sC_l,
                 mask=m_nt, other=0.0).to(tl.float32)
    decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
    dtu = dt * u
    inp = dtu[:, None, :] * Bt[None, :, :]
    return pos, ok, in_seq, m_dt, m_nt, u, dt_raw, dt, dtu, Bt, Ct, decay, inp


@triton.jit(do_not_specialize=_NOSPEC)
def _scan_fwd_kernel(u_ptr, dt_ptr, z_ptr, y_ptr, A2_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, idx_ptr,
                     ckpt_ptr, last_ptr,
                     G, Dg, S, L, n_chunks,
                     su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sz_b, sz_g, sz_d, sz_l,
                     sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                     N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, SAVE_CKPT: tl.constexpr,
                     SAVE_LAST: tl.constexpr):
    b, g, offs_d, mask_d, ch, offs_n, mask_n, mask_dn, A2, bias, Dv = _program_tile(
        A2_ptr, Dv_ptr, bias_ptr, G, Dg, N, NP, BLOCK_D, HAS_D, HAS_BIAS)
    last_t = (tl.arange(0, T) == T - 1)[None, None, :]
    # y has the contiguous (batch, G, Dg, L) layout
    y_base = y_ptr + ((b * G + g) * Dg + offs_d[:, None]) * L
    ckpt_base = ckpt_ptr + ((b * G + g) * Dg + offs_d[:, None]) * (n_chunks * NP) + offs_n[None, :]
    h = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    for c in range(0, n_chunks):
        if SAVE_CKPT:
            tl.store(ckpt_base + c * NP, h, mask=mask_dn)
        pos, ok, in_seq, m_dt, m_nt, u, dt_raw, dt, dtu, Bt, Ct, decay, inp = _load_chunk(
            c, b, g, offs_d, mask_d, offs_n, mask_n, A2, bias, u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, S,
            su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
            HAS_BIAS, SOFTPLUS, HAS_INDEX, T)
        decay_prod, states = tl.associative_scan((decay, inp), axis=2, combine_fn=_combine_states)
        states += decay_prod * h[:, :, None]
        y = tl.sum(states * Ct[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + b * sz_b + g * sz_g + offs_d[:, None] * sz_d + pos[None, :] * sz_l,
                         mask=m_dt, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(y_base + pos[None, :], y, mask=m_dt)
        h = tl.sum(tl.where(last_t, states, 0.0), axis=2)
    if SAVE_LAST:
        tl.store(last_ptr + ((b * G + g) * Dg + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit(do_not_specialize=_NOSPEC)
def _scan_bwd_kernel(u_ptr, dt_ptr, z_ptr, dy_ptr, A2_ptr, B_ptr, C_ptr, Dv_ptr, bias_ptr, idx_ptr, ckpt_ptr,
                     du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                     G, Dg, S, L, n_chunks,
                     su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sz_b, sz_g, sz_d, sz_l,
                     sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                     N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_INDEX: tl.constexpr, ATOMIC_BC: tl.constexpr):
    b, g, offs_d, mask_d, ch, offs_n, mask_n, mask_dn, A2, bias, Dv = _program_tile(
        A2_ptr, Dv_ptr, bias_ptr, G, Dg, N, NP, BLOCK_D, HAS_D, HAS_BIAS)
    A = A2 * (1.0 / _LOG2E)
    first_t = (tl.arange(0, T) == 0)[None, None, :]
    row = (b * G + g) * Dg + offs_d[:, None]  # contiguous (batch, G, Dg, .) rows of dy/du/ddt/dz
    bc_row = (b * G + g) * N + offs_n[:, None]  # contiguous (batch, G, N, L) rows of dB/dC
    ckpt_base = ckpt_ptr + row * (n_chunks * NP) + offs_n[None, :]
    carry = tl.zeros([BLOCK_D, NP], dtype=tl.float32)  # exp(delta A) * g of the step after the chunk
    dA_acc = tl.zeros([BLOCK_D, NP], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        pos, ok, in_seq, m_dt, m_nt, u, dt_raw, dt, dtu, Bt, Ct, decay, inp = _load_chunk(
            c, b, g, offs_d, mask_d, offs_n, mask_n, A2, bias, u_ptr, dt_ptr, B_ptr, C_ptr, idx_ptr, S,
            su_b, su_g, su_d, su_l, sdt_b, sdt_g, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
            HAS_BIAS, SOFTPLUS, HAS_INDEX, T)
        h0 = tl.load(ckpt_base + c * NP, mask=mask_dn, other=0.0)
        decay_prod, states = tl.associative_scan((decay, inp), axis=2, combine_fn=_combine_states)
        states += decay_prod * h0[:, :, None]
        dout = tl.load(dy_ptr + row * L + pos[None, :], mask=m_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b * sz_b + g * sz_g + offs_d[:, None] * sz_d + pos[None, :] * sz_l,
                         mask=m_dt, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            y = tl.sum(states * Ct[None, :, :], axis=1) + Dv[:, None] * u
            tl.store(dz_ptr + row * L + pos[None, :], dout * y * sig * (1.0 + zv * (1.0 - sig)), mask=m_dt)
            dy = dout * zv * sig
        else:
            dy = dout
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        ones = tl.full([BLOCK_D, NP, T], 1.0, dtype=tl.float32)
        _, gb, gq = tl.associative_scan((decay, Ct[None, :, :] * dy[:, None, :], ones), axis=2,
                                        combine_fn=_combine_adjoint, reverse=True)
        adj = gb + gq * carry[:, :, None]  # dL/dh_t
        carry = tl.sum(tl.where(first_t, decay * adj, 0.0), axis=2)
        prev = states - inp  # exp(delta_t A) * h_{t-1}
        ddt = tl.sum(adj * (A[:, :, None] * prev + Bt[None, :, :] * u[:, None, :]), axis=1)
        du = tl.sum(adj * Bt[None, :, :], axis=1) * dt + Dv[:, None] * dy
        dA_acc += tl.sum(adj * prev * dt[:, None, :], axis=2)
        if SOFTPLUS:
            ddt = tl.where(dt_raw <= _SOFTPLUS_THRESHOLD, ddt * tl.sigmoid(dt_raw), ddt)
        ddt = tl.where(in_seq[None, :], ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(tl.where(mask_d[:, None], ddt, 0.0), axis=1)
        tl.store(du_ptr + row * L + pos[None, :], du, mask=m_dt)
        tl.store(ddt_ptr + row * L + pos[None, :], ddt, mask=m_dt)
        dB = tl.sum(tl.where(mask_d[:, None, None], adj * dtu[:, None, :], 0.0), axis=0)
        dC = tl.sum(tl.where(mask_d[:, None, None], states * dy[:, None, :], 0.0), axis=0)
        if ATOMIC_BC:
            tl.atomic_add(dB_ptr + bc_row * L + pos[None, :], dB, mask=m_nt)
            tl.atomic_add(dC_ptr + bc_row * L + pos[None, :], dC, mask=m_nt)
        else:
            tl.store(dB_ptr + bc_row * L + pos[None, :], dB, mask=m_nt)
            tl.store(dC_ptr + bc_row * L + pos[None, :], dC, mask=m_nt)
    part = b * (G * Dg) + ch  # per-batch partials, summed on the host
    tl.store(dA_ptr + part[:, None] * N + offs_n[None, :], dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + part, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)


# Channel tile (BLOCK_D) per padded d_state at T = 16 and 4 warps: both kernels compile for sm_90 without
# register spills, and one step wider spills or sits at the 255-register limit (read from the cubins by
# benchmarks/kernel_resources.py). tests/ops/test_scan_triton_compile.py keeps the first part true.
_BLOCK_D_BY_NP = {1: 32, 2: 32, 4: 16, 8: 8, 16: 8, 32: 2, 64: 1}


def launch_config(Dg: int, N: int, S: int, interpret: bool):
    """(BLOCK_D, T, num_warps): fixed heuristics, no autotuning. On a GPU: chunks of 16 steps and the channel
    tile of _BLOCK_D_BY_NP, chosen against register spills (a static criterion; not yet timed on a GPU)."""
    if interpret:  # every element of a scan is a Python call in the interpreter: keep tiles tiny
        return min(4, triton.next_power_of_2(Dg)), min(8, triton.next_power_of_2(S)), 1
    T = min(16, triton.next_power_of_2(S))
    return min(triton.next_power_of_2(Dg), _BLOCK_D_BY_NP[triton.next_power_of_2(N)]), T, 4


def _strides4(t):
    return [t.stride(i) for i in range(4)]


class _TritonScan(torch.autograd.Function):
    """Grouped scan over (batch, G, Dg, L) views with an optional (G, S) index table."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, Dv, z, delta_bias, softplus, index, S, return_last, config):
        batch, G, Dg, L = u.shape
        N = A.shape[1]
        interpret = u.device.type == "cpu"
        block_d, T, warps = config or launch_config(Dg, N, S, interpret)
        n_chunks = triton.cdiv(S, T)
        NP = triton.next_power_of_2(N)
        A2 = (A.float() * LOG2E).contiguous()
        Dv32 = None if Dv is None else Dv.float().contiguous()
        bias32 = None if delta_bias is None else delta_bias.float().contiguous()
        need_grad = any(ctx.needs_input_grad)
        y = (torch.zeros if index is not None else torch.empty)((batch, G, Dg, L), device=u.device, dtype=u.dtype)
        ckpt = torch.empty((batch, G, Dg, n_chunks, NP) if need_grad else (1,), device=u.device, dtype=torch.float32)
        last = torch.empty((batch, G * Dg, N) if return_last else (1,), device=u.device, dtype=torch.float32)
        dummy = A2
        grid = (triton.cdiv(Dg, block_d), batch * G)
        # FMA fusion stated, not left to Triton's default (which turns off in 3.10, and warns until then)
        _scan_fwd_kernel[grid](
            u, delta, z if z is not None else dummy, y, A2, B, C, Dv32 if Dv32 is not None else dummy,
            bias32 if bias32 is not None else dummy, index if index is not None else dummy, ckpt, last,
            G, Dg, S, L, n_chunks, *_strides4(u), *_strides4(delta), *(_strides4(z) if z is not None else [0] * 4),
            *_strides4(B), *_strides4(C),
            N=N, NP=NP, BLOCK_D=block_d, T=T, HAS_D=Dv is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), HAS_INDEX=index is not None,
            SAVE_CKPT=need_grad, SAVE_LAST=bool(return_last), num_warps=warps,
            enable_fp_fusion=True)
        ctx.save_for_backward(u, delta, A2, B, C, Dv32, z, bias32, index, ckpt)
        ctx.meta = (softplus, S, block_d, T, warps, n_chunks, A.dtype, None if Dv is None else Dv.dtype,
                    None if delta_bias is None else delta_bias.dtype)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A2, B, C, Dv32, z, bias32, index, ckpt = ctx.saved_tensors
        softplus, S, block_d, T, warps, n_chunks, A_dtype, D_dtype, bias_dtype = ctx.meta
        batch, G, Dg, L = u.shape
        N = A2.shape[1]
        dy = dy.contiguous()
        dev = u.device
        zeros = torch.zeros if index is not None else torch.empty  # unvisited positions get zero grads
        du = zeros((batch, G, Dg, L), device=dev, dtype=u.dtype)
        ddt = zeros((batch, G, Dg, L), device=dev, dtype=delta.dtype)
        dz = zeros((batch, G, Dg, L), device=dev, dtype=z.dtype) if z is not None else None
        n_dblocks = triton.cdiv(Dg, block_d)
        dB = torch.zeros((batch, G, N, L), device=dev, dtype=torch.float32)
        dC = torch.zeros((batch, G, N, L), device=dev, dtype=torch.float32)
        dA = torch.empty((batch, G * Dg, N), device=dev, dtype=torch.float32)
        dD = torch.empty((batch, G * Dg), device=dev, dtype=torch.float32) if Dv32 is not None else None
        dbias = torch.empty((batch, G * Dg), device=dev, dtype=torch.float32) if bias32 is not None else None
        dummy = A2
        _scan_bwd_kernel[(n_dblocks, batch * G)](
            u, delta, z if z is not None else dummy, dy, A2, B, C, Dv32 if Dv32 is not None else dummy,
            bias32 if bias32 is not None else dummy, index if index is not None else dummy, ckpt,
            du, ddt, dz if dz is not None else dummy, dB, dC, dA, dD if dD is not None else dummy,
            dbias if dbias is not None else dummy,
            G, Dg, S, L, n_chunks, *_strides4(u), *_strides4(delta), *(_strides4(z) if z is not None else [0] * 4),
            *_strides4(B), *_strides4(C),
            N=N, NP=triton.next_power_of_2(N), BLOCK_D=block_d, T=T, HAS_D=Dv32 is not None,
            HAS_Z=z is not None, HAS_BIAS=bias32 is not None, SOFTPLUS=bool(softplus),
            HAS_INDEX=index is not None, ATOMIC_BC=n_dblocks > 1, num_warps=warps,
            enable_fp_fusion=True)
        dA = dA.sum(0).to(A_dtype)
        dD = dD.sum(0).to(D_dtype) if dD is not None else None
        dbias = dbias.sum(0).to(bias_dtype) if dbias is not None else None
        return (du, ddt, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None, None, None, None, None)


def _check_n(N: int) -> None:
    if N > 64:
        raise UserError(f"A: the triton backend supports d_state N <= 64, got N = {N}; use backend='torch'")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, config=None):
    """`selective_scan` on the Triton kernels. Shapes as in `nas.ops.selective_scan` (already checked).

    config: optional (BLOCK_D, T, num_warps) override, for benchmarks.
    """
    batch, dim, L = u.shape
    _check_n(A.shape[1])
    G = 1 if B.dim() == 3 else B.shape[1]
    Dg = dim // G
    B4 = B.unsqueeze(1) if B.dim() == 3 else B
    C4 = C.unsqueeze(1) if C.dim() == 3 else C
    u4, dt4 = u.unflatten(1, (G, Dg)), delta.unflatten(1, (G, Dg))
    z4 = None if z is None else z.unflatten(1, (G, Dg))
    y, last = _TritonScan.apply(u4, dt4, A, B4, C4, D, z4, delta_bias, delta_softplus, None, L,
                                return_last_state, config)
    y = y.view(batch, dim, L)
    return (y, last) if return_last_state else y


def multi_direction_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                index=None, config=None):
    """`multi_direction_scan` in one launch: K directions as K groups, tokens read via `index`."""
    batch, K, dim, L = u.shape
    _check_n(A.shape[2])
    S = L if index is None else index.shape[1]
    idx = None if index is None else index.to(torch.int32).contiguous()
    y, _ = _TritonScan.apply(u, delta, A.reshape(K * dim, -1), B, C, None if D is None else D.reshape(-1), z,
                             None if delta_bias is None else delta_bias.reshape(-1), delta_softplus, idx, S,
                             False, config)
    return y
