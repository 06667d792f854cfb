"""The selective scan on CPU as one compiled kernel (``csrc/scan_cpu.c``), with a hand-written backward.

Same semantics as ``selective_scan_ref`` (see ``nas.ops.selective_scan``). Why a compiled kernel: the
PyTorch backend (``nas.ops.scan_torch``) runs a handful of PyTorch ops per time step, and on a CPU each
op's fixed cost and its pass through memory, not the arithmetic, set its time (3.6x-3.8x the time of
the exponentials and multiply-adds it must do, in benchmarks/results/bench_supernet_cpu.json). The kernel keeps the state of 16 channels (8 without
AVX-512) in the lanes of a vector and does a whole time step in registers and L1.

- One pass does everything: delta's bias and softplus, the recurrence, the D term and the z gate
  forward; the backward recomputes the forward and returns the gradient of every input. Done as
  separate PyTorch ops, that elementwise work alone took longer than the recurrence.
- Work items are (batch element, group, block of channels), split over threads in contiguous runs.
  Each item writes only its own outputs (per batch element for gA, per channel block for gB and gC,
  summed here), so the result is the same for any thread count.
- The backward recomputes the forward of one channel vector at a time and keeps its L states and
  decays (one vector x N x L values: 64 KB at the demo's N 16, L 64); nothing of size (batch, D, L, N)
  is ever stored.
- exp2 is a degree-7 polynomial (relative error about 1e-7) and softplus's log1p a series in fp32;
  the float64 path (for gradcheck) calls libm per lane.

The kernel is built on first use by ``nas.ops.cpu_kernels``; where it cannot be, "auto" uses the
PyTorch scan.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from nas.ops import cpu_kernels
from nas.ops.selective_scan import compute_dtype

# Below this many (batch, group) items the channels of a group are split into blocks, so that every
# thread has work; a shape-only rule, so that results do not depend on the thread count.
MIN_ITEMS = 16


def _blocks(batch: int, G: int, dg: int, lanes: int) -> tuple[int, int]:
    """(number of channel blocks per group, channels per block, a multiple of the lane count)."""
    vectors = -(-dg // lanes)
    want = 1 if batch * G >= MIN_ITEMS else min(vectors, -(-MIN_ITEMS // (batch * G)))
    block = -(-vectors // want) * lanes
    return -(-dg // block), block


class SelectiveScanCpuFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ct = compute_dtype(u.dtype)
        batch, dim, L = u.shape
        B4, C4 = ((X.unsqueeze(1) if X.dim() == 3 else X) for X in (B, C))
        x, d, Ac, B4, C4, Dc, zc, bias = (None if t is None else t.to(ct).contiguous()
                                          for t in (u, delta, A, B4, C4, D, z, delta_bias))
        G, N = B4.shape[1], A.shape[1]
        nblocks, block = _blocks(batch, G, dim // G, cpu_kernels.lanes(ct))
        y = torch.empty((batch, dim, L), dtype=ct)
        last = torch.empty((batch, dim, N), dtype=ct)
        cpu_kernels.run("scan_forward", ct, x, d, Ac, B4, C4, Dc, zc, bias, y, last, batch, G, dim // G, L, N,
                        nblocks, block, delta_softplus)
        ctx.save_for_backward(x, d, Ac, B4, C4, Dc, zc, bias)
        ctx.meta = (delta_softplus, [X.dim() for X in (B, C)],
                    [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias)],
                    nblocks, block)
        y = y.to(u.dtype)
        if not return_last_state:
            return y
        return y, last.to(torch.float32 if ct == torch.float32 else ct)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_last=None):
        x, d, Ac, B4, C4, Dc, zc, bias = ctx.saved_tensors
        softplus, bc_dims, dtypes, nblocks, block = ctx.meta
        ct = x.dtype
        batch, dim, L = x.shape
        G, N = B4.shape[1], Ac.shape[1]
        gy = gy.to(ct).contiguous()
        g_last = None if g_last is None else g_last.to(ct).contiguous()
        gu, gdelta = torch.empty_like(x), torch.empty_like(x)
        gz = None if zc is None else torch.empty_like(x)
        gA = torch.empty((batch, dim, N), dtype=ct)
        gD = None if Dc is None else torch.empty((batch, dim), dtype=ct)
        g_bias = None if bias is None else torch.empty((batch, dim), dtype=ct)
        gB, gC = torch.empty((2, nblocks, batch, G, N, L), dtype=ct).unbind(0)
        cpu_kernels.run("scan_backward", ct, x, d, Ac, B4, C4, Dc, zc, bias, gy, g_last, gu, gdelta, gz, gA, gD, g_bias,
                        gB, gC, batch, G, dim // G, L, N, nblocks, block, softplus)
        # per batch element and per channel block -> totals
        gB, gC = (g[0] if nblocks == 1 else g.sum(0) for g in (gB, gC))
        gB, gC = (g.squeeze(1) if ndim == 3 else g for g, ndim in zip((gB, gC), bc_dims))
        gA, gD, g_bias = (None if g is None else g.sum(0) for g in (gA, gD, g_bias))
        grads = [gu, gdelta, gA, gB, gC, gD, gz, g_bias]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes)]
        return (*grads, None, None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan by the compiled CPU kernel (CPU tensors), with a hand-written backward.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Inputs are assumed validated and the kernel available (``nas.ops.selective_scan`` checks both).
    Returns y (batch, D, L) in u's dtype [, last state (batch, D, N) in fp32, float64 for float64 inputs].
    """
    return SelectiveScanCpuFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                    bool(return_last_state))
