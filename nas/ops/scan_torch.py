"""The selective scan in plain PyTorch: a time-chunked sequential scan with a hand-written backward.

Same semantics as ``selective_scan_ref`` (see ``nas.ops.selective_scan``). Why this shape:

- The decay exp(delta_t * A) depends on the state index n, so a matrix ("segsum") form of a chunk of
  T steps costs T times more exponentials than the recurrence itself, and on a CPU the exponentials
  dominate. We keep the plain recurrence h_t = a_t * h_{t-1} + b_t: one in-place ``addcmul_`` per
  time step over a contiguous (batch, D, N) slice (time-major layout). Only exp(delta_t * A) <= 1 is
  ever exponentiated, never a cumulative sum.
- Time is cut into chunks of T steps. A chunk's (T, batch, D, N) decays and states live in work
  buffers reused by every chunk (cache-sized); only the state entering each chunk is kept,
  (L / T) x (batch, D, N). Nothing of size (batch, D, L, N) is ever stored. The elementwise work of
  size (L, batch, D) around the scan (softplus, delta * u, D, the z gate and their gradients) is done
  once per tile, outside the chunk loop, so that only ops on the state run per chunk or per step.
- Keeping every chunk's decays and states for the backward (instead of recomputing them, with their
  exponentials) was measured slower on CPU: they no longer fit in cache, and writing and reading them
  back through memory costs more than the recomputation.
- The backward walks the chunks in reverse: it recomputes a chunk's states from its saved entry
  state, runs the adjoint recurrence g_t = C_t * dy_t + a_{t+1} * g_{t+1} backwards in time, and
  turns (h, g) into the gradients of every input with batched matmuls and in-place products.
- The state's rows (one per batch element and group, N x D/G values) are independent: they are cut
  into tiles of about TILE_ELEMS values per thread, and each tile runs the whole chunked scan before
  the next. Untiled, at (batch 8, 8 groups of 256 channels, N 16) the state is 4 MB and each work
  buffer 15 MB, every per-step update streams through memory, and one call over all groups is slower
  than a loop over them. A tile's state and its work buffers stay in L2, while its per-step ops stay
  large enough to hide PyTorch's per-op overhead.
- What bounds it: every PyTorch op is one pass over its operands, and a chunk's forward and backward
  take about 36 such reads and writes of 4 bytes per state value and step; at cache bandwidth that,
  not the exponentials or the multiply-adds, sets the time (``benchmarks/bench_supernet.py`` prints
  the time against both floors).

Arithmetic is fp32 (float64 for float64 inputs); y comes back in u's dtype, the last state in fp32
(float64 for float64 inputs, as the reference does). On 2 CPU cores, forward + backward at
(batch 8, D 256, N 16, L 196) is tens of times faster than an autograd loop over time, with a
fraction of its peak memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nas.ops.selective_scan import compute_dtype

# Tile rows: None picks the most (batch, group) rows whose state holds at most TILE_ELEMS values per
# CPU thread (128 KB of fp32 per thread measured best on 1 and 2 threads; smaller tiles lose to the
# per-op overhead). Chunk length T: None picks, on CPU, the most steps whose (T, rows, N, D/G) work
# tensor holds at most CHUNK_ELEMS values per thread (4 to 64 steps): the three work buffers of the
# backward then stay in L2 (512 KB each per thread; the 2 MB buffers of 4x larger chunks measured
# 10-20% slower, every elementwise pass over them reading L3). Elsewhere (one tile for the whole
# state) at least max(4, sqrt(L)) steps, so that the L / T saved chunk states cost about as much as the
# work buffers. Set ints to force them (tests).
CHUNK = None
CHUNK_ELEMS = 1 << 17
TILE_ROWS = None
TILE_ELEMS = 1 << 15
# also read by the Triton kernels (nas.ops.scan_triton)
SOFTPLUS_THRESHOLD = 20.0  # mamba's: softplus(x) = x above it
LOG2E = 1.4426950408889634


@torch.compiler.assume_constant_result  # a constant to torch.compile, which cannot trace the query (it sets only speed)
def _threads() -> int:
    return torch.get_num_threads()


def _chunk_len(L: int, rows: int, row: int, device: torch.device) -> int:
    """T for a tile of `rows` rows of `row` state values each."""
    if CHUNK:
        T = CHUNK
    elif device.type == "cpu":
        T = max(4, min(64, CHUNK_ELEMS * _threads() // (rows * row)))
    else:
        T = max(4, math.isqrt(L), min(64, CHUNK_ELEMS // max(1, rows * row)))
    return max(1, min(T, L))


def _to_tm(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """(batch, ..., L) -> a new contiguous time-major (L, batch, ...) tensor in dtype ct.

    Done as one 2D transpose copy (..., L) -> (L, ...), which PyTorch does in cache blocks; a 3D
    permute copy is several times slower when L is a power of two."""
    L = x.shape[-1]
    x2 = x.to(ct).reshape(-1, L)
    return torch.empty((L, x2.shape[0]), dtype=ct, device=x.device).copy_(x2.t()).view(L, *x.shape[:-1])


def _from_tm_into(out: torch.Tensor, xT: torch.Tensor) -> None:
    """Time-major (L, rows...) -> out (rows..., L), a slice of one contiguous block (converts the dtype)."""
    L = xT.shape[0]
    out.view(-1, L).copy_(xT.reshape(L, -1).t())


# State layout. The state of step t is kept as (batch, G, N, D/G): channel d = g * D/G + j sits at
# [g, :, j]. Then <C_t, h_t> and the other contractions over N are (1, N) @ (N, D/G) matmuls, which
# are fast, where (D/G, N) @ (N, 1) with its length-16 inner product is not.

def _delta(d_raw, softplus, need_grad=False):
    """Chunk of delta (+ bias) (t, batch, D) -> dt [, d dt / d d_raw]: softplus with threshold 20."""
    if not softplus:
        return d_raw, None
    dt = F.softplus(d_raw, threshold=SOFTPLUS_THRESHOLD)
    if not need_grad:
        return dt, None
    # d softplus(v)/dv = sigmoid(v), and 1 above the threshold where softplus(v) = v.
    return dt, torch.sigmoid(d_raw).masked_fill_(d_raw > SOFTPLUS_THRESHOLD, 1.0)


class _Scan:
    """The time-major inputs of one tile and the chunked forward / backward passes over them.

    xT, dT, zT: (L, batch, D) u, delta + delta_bias (before softplus) and z; At: (G, N, D/G) A in the
    state layout; BT, CT: (L, batch, G, N); Dv: (D,) or None (batch, G and D those of the tile). T: the
    chunk length; work: (2 T + 1, at least the tile's state size) (3 T + 1 for the backward).
    Everything of size (L, batch, D) (softplus, delta * u, the D term, the z gate and their gradients) is
    done once for the whole tile, outside the chunk loop: only the ops on the (batch, G, N, D/G) state
    run per chunk or per step.
    """

    def __init__(self, xT, dT, zT, At, BT, CT, Dv, softplus, T, work):
        self.xT, self.zT, self.At, self.BT, self.CT, self.Dv = xT, zT, At, BT, CT, Dv
        self.dT, self.softplus = dT, softplus
        L, batch, _ = xT.shape
        self.T = T
        self.starts = range(0, L, T)
        self.At2 = At * LOG2E
        # work buffers, shared by all tiles and reused by every chunk: T decays, T + 1 states, T adjoints
        shape = (work.shape[0], batch) + At.shape
        bufs = work.view(-1)[:math.prod(shape)].view(shape)
        self.abuf, self.hbuf, self.gbuf = bufs[:T], bufs[T:2 * T + 1], bufs[2 * T + 1:]

    def states(self, s, t, dt, dtx, h0):
        """Chunk [s, s + t): a = exp(dt * A) (t, batch, G, N, D/G) and h (t + 1, ...) with h[0] = h0 and
        h[i + 1] the state after step s + i (views into the work buffers)."""
        G, N, dg = self.At.shape
        batch = dt.shape[1]
        a = torch.mul(dt[s:s + t].view(t, batch, G, 1, dg), self.At2, out=self.abuf[:t]).exp2_()
        h = self.hbuf[:t + 1]
        h[0].copy_(h0)
        # the input term dt * u * B
        torch.mul(dtx[s:s + t].view(t, batch, G, 1, dg), self.BT[s:s + t].unsqueeze(-1), out=h[1:])
        hs, as_ = h.unbind(0), a.unbind(0)
        for i in range(t):
            hs[i + 1].addcmul_(as_[i], hs[i])
        return a, h

    def forward(self, states):
        """Fills states (n_chunks, batch, G, N, D/G) with the state entering every chunk; returns y (L,
        batch, D), y before the z gate (for the backward; None without z) and the last state (a view
        into the work buffer)."""
        xT = self.xT
        L, batch, dim = xT.shape
        G, N, dg = self.At.shape
        dt, _ = _delta(self.dT, self.softplus)
        dtx = dt * xT
        y = torch.empty_like(xT)
        states[0].zero_()
        h = None
        for c, s in enumerate(self.starts):
            t = min(self.T, L - s)
            _, h = self.states(s, t, dt, dtx, states[c])
            if c + 1 < len(self.starts):
                states[c + 1].copy_(h[t])
            m = t * batch * G
            torch.bmm(self.CT[s:s + t].view(m, 1, N), h[1:].view(m, N, dg), out=y[s:s + t].view(m, 1, dg))
        if self.Dv is not None:
            y.addcmul_(xT, self.Dv)
        if self.zT is None:
            return y, None, h[t]
        return y * F.silu(self.zT), y, h[t]

    def backward(self, gyT, y1, g_last, states):
        """gyT: (L, batch, D) gradient of y; y1: y before the z gate (None without z); g_last: (batch, G,
        N, D/G) gradient of the last state, or None. Returns the gradients of u, delta (before softplus)
        and z, time-major (L, batch, D), of B, C (L, batch, G, N), of A in the state layout (G, N, D/G)
        and of D (D,)."""
        At, BT, CT, Dv, zT, xT = self.At, self.BT, self.CT, self.Dv, self.zT, self.xT
        L, batch, dim = gyT.shape
        G, N, dg = At.shape
        gzT = gD = None
        gy = gyT
        if zT is not None:  # y = y1 * silu(z), y1 = y0 + D u; d silu(z)/dz = s (1 + z (1 - s)), s = sigmoid(z)
            sz = torch.sigmoid(zT)
            gzT = torch.mul(gyT, y1).mul_((1 - sz).mul_(zT).add_(1).mul_(sz))
            gy = gyT * sz.mul_(zT)
        if Dv is not None:
            gD = (gy * xT).sum((0, 1))
        dt, sp_grad = _delta(self.dT, self.softplus, need_grad=True)
        dtx = dt * xT
        gB, gC = torch.empty_like(BT), torch.empty_like(CT)
        g_dtx, gdt = torch.empty_like(xT), torch.empty_like(xT)
        gAt = torch.zeros_like(At)
        # d loss / d h at the end of the current chunk, from later steps
        carry = torch.zeros_like(self.hbuf[0]) if g_last is None else torch.empty_like(self.hbuf[0]).copy_(g_last)
        for c in reversed(range(len(self.starts))):
            s = self.starts[c]
            t = min(self.T, L - s)
            m = t * batch * G
            a, h = self.states(s, t, dt, dtx, states[c])
            # Adjoint: g[i] = d loss / d h_i = C_i * dy_i + a_{i+1} * g[i+1].
            g = torch.mul(gy[s:s + t].view(t, batch, G, 1, dg), CT[s:s + t].unsqueeze(-1), out=self.gbuf[:t])
            g[t - 1].add_(carry)
            gs, as_ = g.unbind(0), a.unbind(0)
            for i in range(t - 2, -1, -1):
                gs[i].addcmul_(as_[i + 1], gs[i + 1])
            torch.mul(as_[0], gs[0], out=carry)
            hv, gv = h[1:].view(m, N, dg), g.view(m, N, dg)
            # y0 = <C, h>  ->  gC[n] = sum_j dy[j] h[n, j]  (over the channels j of the group)
            torch.bmm(gy[s:s + t].view(m, 1, dg), hv.transpose(1, 2), out=gC[s:s + t].view(m, 1, N))
            # input term dtx * B  ->  g_dtx = <B, g>,  gB[n] = sum_j dtx[j] g[n, j]
            torch.bmm(BT[s:s + t].view(m, 1, N), gv, out=g_dtx[s:s + t].view(m, 1, dg))
            torch.bmm(dtx[s:s + t].view(m, 1, dg), gv.transpose(1, 2), out=gB[s:s + t].view(m, 1, N))
            # decay a = exp(dt * A) multiplies h_{i-1}: q = d loss / d(dt * A) = g * a * h_{i-1}
            q = a.mul_(g).mul_(h[:-1])
            torch.sum(torch.mul(q, At, out=g), 3, out=gdt[s:s + t].view(t, batch, G, dg))
            gAt.add_(torch.mul(q, dt[s:s + t].view(t, batch, G, 1, dg), out=h[1:]).sum((0, 1)))
        # u and dt enter through dtx = dt * u, and u through D u
        gxT = g_dtx * dt
        if Dv is not None:
            gxT.addcmul_(gy, Dv)
        gdt.addcmul_(g_dtx, xT)
        if sp_grad is not None:
            gdt.mul_(sp_grad)
        return gxT, gdt, gzT, gB, gC, gAt, gD


def _split(n: int, most: int) -> list[slice]:
    """range(n) in the fewest runs of at most `most`, of near-equal lengths."""
    size = -(-n // -(-n // most))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _plan(L, batch, G, N, dg, device=torch.device("cpu")):
    """The chunk length T, the tiles and their most rows. Tiles are (batch slice, group slice) pairs
    covering the (batch, group) rows of the state, R rows at most: runs of whole batch elements when
    R >= G, else runs of groups of one batch element (so a tile's slice of every input is one
    contiguous block per time step). On CPU a tile's state holds about TILE_ELEMS values per thread
    (PyTorch splits an elementwise op of n values over min(threads, n / 32768) threads); a GPU runs
    the whole state as one tile."""
    fit = max(1, TILE_ELEMS * _threads() // (N * dg)) if device.type == "cpu" else batch * G
    R = min(TILE_ROWS or fit, batch * G)
    if R >= G:
        tiles = [(bs, slice(0, G)) for bs in _split(batch, R // G)]
    else:
        tiles = [(slice(b, b + 1), gs) for b in range(batch) for gs in _split(G, R)]
    rows = max((bs.stop - bs.start) * (gs.stop - gs.start) for bs, gs in tiles)
    return _chunk_len(L, rows, N * dg, device), tiles, rows


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ct = compute_dtype(u.dtype)
        batch, dim, L = u.shape
        G = 1 if B.dim() == 3 else B.shape[1]
        N, dg = A.shape[1], dim // G
        At = A.to(ct).reshape(G, dg, N).transpose(1, 2).contiguous()
        B4, C4 = (X.unsqueeze(1) if X.dim() == 3 else X for X in (B, C))  # (batch, G, N, L)
        Dv = None if D is None else D.to(ct)
        bias = None if delta_bias is None else delta_bias.to(ct)
        T, tiles, rows = _plan(L, batch, G, N, dg, u.device)
        work = u.new_empty((2 * T + 1, rows * N * dg), dtype=ct)
        states = u.new_empty((len(range(0, L, T)), batch, G, N, dg), dtype=ct)
        last = u.new_empty((batch, G, N, dg), dtype=ct)
        y = torch.empty_like(u, memory_format=torch.contiguous_format)
        saved = []
        for bs, gs in tiles:
            cs = slice(gs.start * dg, gs.stop * dg)  # the tile's channels
            xT, dT = _to_tm(u[bs, cs], ct), _to_tm(delta[bs, cs], ct)  # (L, batch, D) of the tile
            if bias is not None:
                dT += bias[cs]
            zT = None if z is None else _to_tm(z[bs, cs], ct)
            BT, CT = _to_tm(B4[bs, gs], ct), _to_tm(C4[bs, gs], ct)  # (L, batch, G, N)
            scan = _Scan(xT, dT, zT, At[gs], BT, CT, None if Dv is None else Dv[cs], delta_softplus, T, work)
            yT, y1T, last[bs, gs] = scan.forward(states[:, bs, gs])
            _from_tm_into(y[bs, cs], yT)
            saved += [xT, dT, zT, BT, CT, y1T]
        ctx.save_for_backward(At, Dv, states, *saved)
        ctx.plan = (T, tiles, rows)
        ctx.softplus = delta_softplus
        ctx.meta = ([X.dim() for X in (B, C)], [None if t is None else t.dtype
                                                for t in (u, delta, A, B, C, D, z, delta_bias)])
        if not return_last_state:
            return y
        return y, last.transpose(2, 3).reshape(batch, dim, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_last=None):
        At, Dv, states, *saved = ctx.saved_tensors
        T, tiles, rows = ctx.plan
        bc_dims, dtypes = ctx.meta
        ct = At.dtype
        G, N, dg = At.shape
        batch, dim, L = states.shape[1], G * dg, saved[0].shape[0]
        if g_last is not None:
            g_last = g_last.to(ct).reshape(batch, G, dg, N).transpose(2, 3)
        new = lambda *shape, i: gy.new_empty(shape, dtype=dtypes[i])  # noqa: E731
        gu, gdelta = new(batch, dim, L, i=0), new(batch, dim, L, i=1)
        gz = None if dtypes[6] is None else new(batch, dim, L, i=6)
        gB, gC = new(batch, G, N, L, i=3), new(batch, G, N, L, i=4)
        gAt = torch.zeros_like(At)
        gD = None if Dv is None else torch.zeros_like(Dv)
        g_bias = None if dtypes[7] is None else At.new_zeros(dim)
        work = At.new_empty((3 * T + 1, rows * N * dg))
        for i, (bs, gs) in enumerate(tiles):
            cs = slice(gs.start * dg, gs.stop * dg)
            xT, dT, zT, BT, CT, y1T = saved[6 * i:6 * i + 6]
            scan = _Scan(xT, dT, zT, At[gs], BT, CT, None if Dv is None else Dv[cs], ctx.softplus, T, work)
            gxT, gdT, gzT, gBT, gCT, gAt_t, gD_t = scan.backward(
                _to_tm(gy[bs, cs], ct), y1T, None if g_last is None else g_last[bs, gs], states[:, bs, gs])
            for out, g in ((gu[bs, cs], gxT), (gdelta[bs, cs], gdT), (gB[bs, gs], gBT), (gC[bs, gs], gCT)):
                _from_tm_into(out, g)
            if gz is not None:
                _from_tm_into(gz[bs, cs], gzT)
            gAt[gs] += gAt_t
            if gD is not None:
                gD[cs] += gD_t
            if g_bias is not None:
                g_bias[cs] += gdT.sum((0, 1))
        # (batch, N, L) for an ungrouped B or C
        gB, gC = (g.squeeze(1) if ndim == 3 else g for g, ndim in zip((gB, gC), bc_dims))
        gA = gAt.transpose(1, 2).reshape(dim, N)
        grads = [gu, gdelta, gA, gB, gC, gD, gz, g_bias]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes)]
        return (*grads, None, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Selective scan in PyTorch (any device), with a hand-written backward.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Inputs are assumed validated (``nas.ops.selective_scan`` does it). Returns y (batch, D, L) in u's
    dtype [, last state (batch, D, N) in fp32, float64 for float64 inputs].
    """
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                 bool(return_last_state))
