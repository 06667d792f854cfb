"""Triton selective scan: forward and backward, one launch for all directions (groups) of a layer.

The kernels are in nas.ops.scan_triton_kernels (their design is described there); this module chooses their
launch configs and tiles, registers them as PyTorch operators (nas::selective_scan_triton and its backward,
torch.library.triton_op, so torch.compile keeps their launches in its graph) and serves the two entry points:
``selective_scan_triton`` (one scan, B/C shared or grouped) and ``multi_direction_scan_triton`` (K directions
read through a scan-order table, in one launch).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from nas.errors import UserError
from nas.ops.scan_torch import LOG2E
from nas.ops.scan_triton_kernels import _scan_bwd_kernel, _scan_fwd_kernel


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
