"""The selective scan in closed form over chunks of time: standard tensor ops only, for exported graphs (ONNX).

Same semantics as ``selective_scan_ref`` (see ``nas.ops.selective_scan``), forward only. Within a chunk of T
steps starting from state h0, with dA_t = delta_t * A and s_t = dA_1 + ... + dA_t (a cumulative sum),

    h_t = exp(s_t) h0 + sum_{r <= t} exp(s_t - s_r) delta_r B_r u_r

so a chunk is a cumulative sum, one exponential of the (T, T) differences (masked to r <= t before the
exponential: every factor is exp of a sum of dA <= 0, so nothing overflows) and a sum over r; the chunks run
in order, each from the last state of the one before. A Python loop over chunks, unrolled when traced, so
an exporter sees cumsum / exp / mul / sum and no loop construct. T trades ops per chunk (T x T x N values)
against the number of chunks; ``benchmarks/bench_inference.py`` measured it in onnxruntime.

``export_decompositions`` maps the registered CPU operators to these standard-op forms, for
``ExportedProgram.run_decompositions``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nas.ops.causal_conv import causal_conv1d_silu_ref
from nas.ops.scan_torch import SOFTPLUS_THRESHOLD
from nas.ops.selective_scan import compute_dtype, expand_groups

CHUNK = 8


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           chunk: int = CHUNK):
    """u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Returns (y (batch, D, L) in u's dtype, last state (batch, D, N) in the compute dtype)."""
    ct = compute_dtype(u.dtype)
    dim, L = u.shape[1], u.shape[2]
    x, dt = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt, threshold=SOFTPLUS_THRESHOLD)
    # time before state: (batch, D or 1, L, N)
    Bt, Ct = (expand_groups(X.to(ct), dim).transpose(-1, -2) for X in (B, C))
    dA = dt[..., None] * A.to(ct)[:, None, :]  # (batch, D, L, N)
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
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + D.to(ct)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), h


def export_decompositions(chunk: int = CHUNK) -> dict:
    """The registered CPU operators -> their standard-op forms (the scan in chunks of ``chunk`` steps)."""
    from nas.ops import scan_cpu  # noqa: F401  (defines the scan operator)
    return {torch.ops.nas.selective_scan_cpu.default:
            lambda u, delta, A, B, C, D, z, bias, softplus: selective_scan_chunked(u, delta, A, B, C, D, z, bias,
                                                                                   softplus, chunk),
            torch.ops.nas.causal_conv1d_silu_cpu.default: causal_conv1d_silu_ref}
