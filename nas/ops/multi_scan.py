"""All K scan directions of a layer in one call, reading tokens through index tables.

Instead of materializing a permuted copy of every input per direction, each direction k carries a
row of an index table: scan step s of direction k reads source position ``index[k, s]`` of its inputs
(-1: a pad token whose u, delta, B, C and z read as zero, so the state only decays there) and writes
its output back to that same source position. With ``scan_orders(directions, H, W)`` as the table,
raster-order inputs go in and raster-order outputs come out.
"""
from __future__ import annotations

import torch

from nas.ops.scan_index import gather_steps, inverse_table
from nas.ops.selective_scan import _shape, checked_backend, resolve_backend, selective_scan


def check_multi_inputs(u, delta, A, B, C, D, z, delta_bias, index):
    """Validate shapes; return (batch, K, dim, L, N, S)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 4:
        raise ValueError(f"u: expected shape (batch, K, D, L), got {_shape(u) if isinstance(u, torch.Tensor) else type(u).__name__}")
    batch, K, dim, L = u.shape
    if not isinstance(A, torch.Tensor) or A.dim() != 3 or A.shape[:2] != (K, dim):
        raise ValueError(f"A: expected shape (K, D, N) = ({K}, {dim}, N), got {_shape(A)}")
    N = A.shape[2]
    for name, t, want in (("delta", delta, (batch, K, dim, L)), ("B", B, (batch, K, N, L)),
                          ("C", C, (batch, K, N, L)), ("z", z, (batch, K, dim, L)),
                          ("D", D, (K, dim)), ("delta_bias", delta_bias, (K, dim))):
        if t is None and name in ("z", "D", "delta_bias"):
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want}, got {_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if index is None:
        return batch, K, dim, L, N, L
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 2 or index.shape[0] != K:
        raise ValueError(f"index: expected a (K, S) int64 tensor with K = {K}, got "
                         f"{(_shape(index) + ' ' + str(index.dtype)) if isinstance(index, torch.Tensor) else type(index).__name__}")
    if index.device != u.device:
        raise ValueError(f"index: expected device {u.device}, got {index.device}")
    return batch, K, dim, L, N, index.shape[1]


def multi_direction_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                               index=None, backend="torch", inverse=None):
    """Gather every input into scan order, run one grouped scan over all K directions, scatter back.

    This is the PyTorch path and the reference for the fused kernel. inverse: ``inverse_table(index, L)``,
    computed here when not given (a data-dependent op that torch.compile cannot hold in one graph).
    """
    batch, K, dim, L = u.shape
    if index is not None:
        u, delta = gather_steps(u, index), gather_steps(delta, index)
        B, C = gather_steps(B, index), gather_steps(C, index)
        z = None if z is None else gather_steps(z, index)
    S = u.shape[-1]
    y = selective_scan(u.reshape(batch, K * dim, S), delta.reshape(batch, K * dim, S), A.reshape(K * dim, -1),
                       B, C, None if D is None else D.reshape(-1),
                       None if z is None else z.reshape(batch, K * dim, S),
                       None if delta_bias is None else delta_bias.reshape(-1), delta_softplus,
                       backend=backend).view(batch, K, dim, S)
    if index is None:
        return y
    return gather_steps(y, inverse_table(index, L) if inverse is None else inverse)


def multi_direction_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                         index=None, backend="auto", inverse=None):
    """Run K selective scans (one per direction) in one call.

    u, delta, z: (batch, K, D, L) in source order (e.g. raster order; an expanded view of one shared
    tensor is fine); A: (K, D, N); B, C: (batch, K, N, L); D, delta_bias: (K, D);
    index: (K, S) int64, scan step s of direction k reads source position index[k, s], -1 for a pad
    step; None means every direction scans positions 0..L-1 in order. inverse: optional (K, L) int64, the source
    position -> scan step table of ``index`` (the second table of ``scan_tables``).
    Returns y: (batch, K, D, L) in source order, u's dtype. Each valid source position must be visited
    once per direction (as ``scan_orders`` tables are); positions no step visits come back as zero.
    """
    check_multi_inputs(u, delta, A, B, C, D, z, delta_bias, index)
    backend = checked_backend(resolve_backend(backend, u.device), backend, u, A, B, D, z, delta_bias,
                              delta_softplus, False, index, multi=True)
    if backend == "triton":
        from nas.ops.scan_triton import multi_direction_scan_triton
        return multi_direction_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, index)
    return multi_direction_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, index, backend, inverse)
