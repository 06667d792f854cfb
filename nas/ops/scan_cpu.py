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


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias):
    """The inputs in the compute dtype, contiguous, B and C grouped (batch, G, N, L)."""
    ct = compute_dtype(u.dtype)
    B4, C4 = ((X.unsqueeze(1) if X.dim() == 3 else X) for X in (B, C))
    return ct, [None if t is None else t.to(ct).contiguous() for t in (u, delta, A, B4, C4, D, z, delta_bias)]


# Defined with torch.library's schema API rather than ``custom_op``, whose wrapper imports torch._dynamo (seconds)
# on a process's first scan.
_ARGS = "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus"
torch.library.define("nas::selective_scan_cpu", f"({_ARGS}) -> (Tensor, Tensor)")
torch.library.define("nas::selective_scan_cpu_backward", f"({_ARGS}, Tensor gy, Tensor g_last) -> Tensor[]")


@torch.library.impl("nas::selective_scan_cpu", "cpu")
def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The kernel's forward: y (batch, D, L) in u's dtype and the last state (batch, D, N) in the compute dtype."""
    ct, (x, d, Ac, B4, C4, Dc, zc, bias) = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, L = u.shape
    G, N = B4.shape[1], A.shape[1]
    nblocks, block = _blocks(batch, G, dim // G, cpu_kernels.lanes(ct))
    y = torch.empty((batch, dim, L), dtype=ct)
    last = torch.empty((batch, dim, N), dtype=ct)
    cpu_kernels.run("scan_forward", ct, x, d, Ac, B4, C4, Dc, zc, bias, y, last, batch, G, dim // G, L, N,
                    nblocks, block, delta_softplus)
    return y.to(u.dtype), last


@torch.library.register_fake("nas::selective_scan_cpu")
def _forward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u, memory_format=torch.contiguous_format), \
        u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=compute_dtype(u.dtype))


@torch.library.impl("nas::selective_scan_cpu_backward", "cpu")
def _backward_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gy, g_last):
    """The kernel's backward (it recomputes the forward): the gradients of u, delta, A, B, C, D, z, delta_bias
    in their dtypes; an empty tensor for an input that is None."""
    ct, (x, d, Ac, B4, C4, Dc, zc, bias) = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, L = x.shape
    G, N = B4.shape[1], Ac.shape[1]
    nblocks, block = _blocks(batch, G, dim // G, cpu_kernels.lanes(ct))
    gy, g_last = gy.to(ct).contiguous(), g_last.to(ct).contiguous()
    gu, gdelta = torch.empty_like(x), torch.empty_like(x)
    gz = None if zc is None else torch.empty_like(x)
    gA = torch.empty((batch, dim, N), dtype=ct)
    gD = None if Dc is None else torch.empty((batch, dim), dtype=ct)
    g_bias = None if bias is None else torch.empty((batch, dim), dtype=ct)
    gB, gC = (torch.empty((nblocks, batch, G, N, L), dtype=ct) for _ in range(2))
    cpu_kernels.run("scan_backward", ct, x, d, Ac, B4, C4, Dc, zc, bias, gy, g_last, gu, gdelta, gz, gA, gD, g_bias,
                    gB, gC, batch, G, dim // G, L, N, nblocks, block, delta_softplus)
    # per batch element and per channel block -> totals
    gB, gC = (g.sum(0).reshape(X.shape) for g, X in ((gB, B), (gC, C)))
    gA, gD, g_bias = (None if g is None else g.sum(0) for g in (gA, gD, g_bias))
    grads = zip((gu, gdelta, gA, gB, gC, gD, gz, g_bias), (u, delta, A, B, C, D, z, delta_bias))
    return [u.new_empty(0) if t is None else g.to(t.dtype) for g, t in grads]


@torch.library.register_fake("nas::selective_scan_cpu_backward")
def _backward_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gy, g_last):
    return [u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (u, delta, A, B, C, D, z, delta_bias)]


def _setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, gy, g_last):
    tensors = ctx.saved_tensors
    grads = torch.ops.nas.selective_scan_cpu_backward(*tensors, ctx.delta_softplus, gy, g_last)
    return (*(None if t is None else g for g, t in zip(grads, tensors)), None)


torch.library.register_autograd("nas::selective_scan_cpu", _backward, setup_context=_setup_context)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan by the compiled CPU kernel (CPU tensors): the operator ``nas::selective_scan_cpu``, whose
    backward is ``nas::selective_scan_cpu_backward``.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Inputs are assumed validated and the kernel available (``nas.ops.selective_scan`` checks both).
    Returns y (batch, D, L) in u's dtype [, last state (batch, D, N) in fp32, float64 for float64 inputs].
    """
    y, last = torch.ops.nas.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y
