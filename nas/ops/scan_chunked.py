"""The selective scan in standard tensor ops only, for exported graphs (ONNX): two forms, forward only.

Same semantics as ``selective_scan_ref`` (see ``nas.ops.selective_scan``).

- ``selective_scan_recurrent``: the decays exp(delta_t * A) and inputs delta_t * B_t * u_t of every step in one
  pass each, then the recurrence h_t = a_t * h_{t-1} + b_t, y_t = <C_t, h_t> through PyTorch's ``scan`` operator,
  which torch.onnx writes as one ONNX ``Scan`` node: a small graph whatever the length, O(batch D L N) memory.
- ``selective_scan_chunked``: the closed form over chunks of T steps. With dA_t = delta_t * A and s_t the
  cumulative sum of dA within the chunk, h_t = exp(s_t) h0 + sum_{r <= t} exp(s_t - s_r) delta_r B_r u_r: a
  cumulative sum, one exponential of the (T, T) differences (masked to r <= t before the exponential: every
  factor is exp of a sum of dA <= 0, so nothing overflows) and a sum over r; the chunks run in order, each from
  the last state of the one before, as a Python loop unrolled in the graph (T times the exponentials, L / T
  copies of the chunk's ops).

``benchmarks/bench_inference.py`` times both in onnxruntime; the exporter uses the recurrent form (the faster,
and a graph that exports in seconds; the chunked one's graph took minutes to export at LocalVim-T's 197 tokens).
``export_decompositions`` maps the registered CPU operators to these forms, for
``ExportedProgram.run_decompositions``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from torch._higher_order_ops.scan import scan  # the operator torch.export keeps and torch.onnx writes as Scan

from nas.ops.causal_conv import causal_conv1d_silu_ref
from nas.ops.scan_torch import SOFTPLUS_THRESHOLD
from nas.ops.selective_scan import compute_dtype, expand_groups



def _inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    """(u, delta after bias and softplus, A, B, C (batch, D or 1, L, N)) in the compute dtype."""
    ct = compute_dtype(u.dtype)
    dim = u.shape[1]
    x, dt = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt, threshold=SOFTPLUS_THRESHOLD)
    Bt, Ct = (expand_groups(X.to(ct), dim).transpose(-1, -2) for X in (B, C))
    return x, dt, A.to(ct), Bt, Ct


def _output(y, u, D, z):
    x = u.to(y.dtype)
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def _step(h, inputs):
    a, b, c = inputs  # (batch, D, N), (batch, D, N), (batch, D or 1, N)
    h = a * h + b
    return h, (h * c).sum(-1)


def selective_scan_recurrent(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Returns (y (batch, D, L) in u's dtype, last state (batch, D, N) in the compute dtype)."""
    x, dt, A, Bt, Ct = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    a = (dt[..., None] * A[:, None, :]).exp().permute(2, 0, 1, 3)  # time-major (L, batch, D, N)
    b = ((dt * x)[..., None] * Bt).permute(2, 0, 1, 3)
    h0 = x.new_zeros(x.shape[0], x.shape[1], A.shape[1])
    last, ys = scan(_step, h0, (a, b, Ct.permute(2, 0, 1, 3)))
    return _output(ys.permute(1, 2, 0), u, D, z), last


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           chunk: int = 8):
    """u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Returns (y (batch, D, L) in u's dtype, last state (batch, D, N) in the compute dtype)."""
    L = u.shape[2]
    x, dt, A, Bt, Ct = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    dA = dt[..., None] * A[:, None, :]  # (batch, D, L, N)
    dBu = (dt * x)[..., None] * Bt
    h = None
    ys = []
    for start in range(0, L, chunk):
        T = min(chunk, L - start)
        s = dA[:, :, start:start + T].cumsum(2)  # (batch, D, T, N)
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()[:, :, None]
        decay = torch.where(causal, s[:, :, :, None] - s[:, :, None], float("-inf")).exp()  # (batch, D, T, T, N)
        hs = (decay * dBu[:, :, None, start:start + T]).sum(3)  # (batch, D, T, N)
        if h is not None:
            hs = hs + s.exp() * h[:, :, None]
        ys.append((hs * Ct[:, :, start:start + T]).sum(-1))
        h = hs[:, :, -1]
    return _output(torch.cat(ys, dim=-1), u, D, z), h


def export_decompositions(chunk: int | None = None) -> dict:
    """The registered CPU operators -> their standard-op forms: the scan recurrent (``chunk`` None) or in closed
    form over chunks of ``chunk`` steps, the conv as PyTorch's."""
    from nas.ops import scan_cpu  # noqa: F401  (defines the scan operator)

    def scan_form(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        if chunk is None:
            return selective_scan_recurrent(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)

    return {torch.ops.nas.selective_scan_cpu.default: scan_form,
            torch.ops.nas.causal_conv1d_silu_cpu.default: causal_conv1d_silu_ref}
