"""The selective scan (Mamba's S6 recurrence) behind one function with several backends.

Semantics follow mamba_ssm's ``selective_scan_ref``:
    delta <- softplus(delta + delta_bias)              (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_{-1} = 0
    y_t    = <C_t, h_t> + D * u_t;   y <- y * silu(z)   (D and z optional)
Arithmetic is fp32 (or float64 for float64 inputs) whatever the input dtype; y comes back in u's dtype
and the last state (batch, D, N) in fp32.

Backends: "ref" (the sequential loop below, the oracle), "torch" (chunked pure PyTorch, any device),
"cpu" (one compiled C kernel, CPU tensors; built on first use, see ``nas.ops.scan_cpu``), "triton"
(CUDA, or CPU under TRITON_INTERPRET=1) and "auto" (triton for CUDA tensors when it imports and the GPU is
recent enough, cpu for CPU tensors when a C compiler is there, else torch). A fast backend checks itself on
its first use (``nas.ops.selfcheck``); "auto" runs torch where it fails.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "ref", "torch", "cpu", "triton")
log = logging.getLogger(__name__)


def _shape(t) -> str:
    return str(tuple(t.shape))


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Validate shapes; return (batch, dim, L, N, groups). Raises ValueError naming the argument."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"u: expected shape (batch, D, L), got {_shape(u)}")
    batch, dim, L = u.shape
    if L < 1:
        raise ValueError(f"u: sequence length L must be at least 1, got shape {_shape(u)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected the shape of u {_shape(u)}, got {_shape(delta)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected shape (D, N) with D = {dim}, got {_shape(A)}")
    if A.is_complex():
        raise ValueError("A: complex A is not supported; expected a real tensor")
    N = A.shape[1]
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and t.shape == (batch, N, L):
            g = 1
        elif t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (N, L) and t.shape[1] >= 1:
            g = t.shape[1]
            if dim % g:
                raise ValueError(f"{name}: D = {dim} channels cannot be split into G = {g} groups (shape {_shape(t)}); G must divide D")
        else:
            raise ValueError(f"{name}: expected shape (batch, N, L) = {(batch, N, L)} or (batch, G, N, L), got {_shape(t)}")
        if groups is not None and g != groups:
            raise ValueError(f"C: expected the same number of groups as B ({groups}), got shape {_shape(t)}")
        groups = g
    for name, t, want in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape))):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != want):
            got = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape {want}, got {got}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"inputs: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return batch, dim, L, N, groups


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, float64 for float64 (so gradcheck can run)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim or 1, N, L) broadcastable over channels."""
    if BC.dim() == 3:
        return BC.unsqueeze(1)
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The plain sequential recurrence: the oracle every other backend is tested against.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    Returns y (batch, D, L) in u's dtype [, last state (batch, D, N) fp32].
    """
    ct = compute_dtype(u.dtype)
    dim = u.shape[1]
    x = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bx, Cx, Ax = expand_groups(B.to(ct), dim), expand_groups(C.to(ct), dim), A.to(ct)
    h = x.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(dt[:, :, t, None] * Ax) * h + (dt[:, :, t] * x[:, :, t])[:, :, None] * Bx[:, :, :, t]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(ct)[:, None] * x
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return (y, h.to(torch.float32 if ct == torch.float32 else ct)) if return_last_state else y


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result  # torch.compile and torch.export take the answer, not the checks behind it
def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend and reject backends that cannot run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_available() and gpu_supported(device):
            return "triton"
        if device.type == "cpu":
            from nas.ops import cpu_kernels, selfcheck
            if cpu_kernels.available():
                return selfcheck.settle("cpu", False, selfcheck.cpu_failure())
            cpu_kernels.note_fallback()
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors (got {device.type}); use backend='auto'")
        from nas.ops import cpu_kernels, selfcheck
        if not cpu_kernels.available():
            raise ValueError(f"backend: 'cpu' is not available here ({cpu_kernels.problem()}); use backend='torch'")
        selfcheck.settle("cpu", True, selfcheck.cpu_failure())
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' needs the triton package, which is not installed; use backend='torch'")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"backend: 'triton' needs CUDA tensors (got {device.type}); on CPU use backend='torch', "
                             "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter")
        if device.type == "cuda" and not gpu_supported(device):
            raise ValueError(f"backend: {_old_gpu(device)}; use backend='torch'")
    return backend


MIN_CAPABILITY = (8, 0)  # the Triton kernels' bf16 and their tile sizes assume Ampere or newer
_warned_gpus: set = set()


def _old_gpu(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return (f"the Triton kernels need a GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} on {device} is {major}.{minor}")


def gpu_supported(device: torch.device) -> bool:
    """Whether the Triton kernels run on this GPU; says once per process why not when they don't."""
    if torch.cuda.get_device_capability(device) >= MIN_CAPABILITY:
        return True
    if device.index not in _warned_gpus:
        _warned_gpus.add(device.index)
        log.warning("%s; using the torch backend", _old_gpu(device))
    return False


def checked_backend(backend: str, requested: str, u, A, B, D, z, delta_bias, delta_softplus, return_last_state,
                    index=None, multi=False) -> str:
    """``backend`` once the Triton kernels passed their self-check for this call's GPU, dtype and options
    (``nas.ops.selfcheck``), else 'torch' (or a UserError when 'triton' was asked for by name)."""
    if backend != "triton" or u.device.type != "cuda":  # the interpreter is not the compiled code
        return backend
    from nas.ops import selfcheck
    options = selfcheck.triton_options(B, D, z, delta_bias, delta_softplus, return_last_state, index, multi)
    return _settled_triton(u.device, u.dtype, A.shape[-1], options, requested == "triton")


@torch.compiler.assume_constant_result  # under torch.compile: run once while tracing, a constant in the graph
def _settled_triton(device: torch.device, dtype: torch.dtype, N: int, options: tuple, by_name: bool) -> str:
    from nas.ops import selfcheck
    return selfcheck.settle("triton", by_name, selfcheck.triton_failure(device, dtype, N, options))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto"):
    """Selective scan with mamba_ssm's ``selective_scan_ref`` semantics (see the module docstring).

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or grouped (batch, G, N, L), channel d
    using group d // (D / G); D, delta_bias: (D,). Returns y (batch, D, L) in u's dtype, and with
    ``return_last_state`` also the final state (batch, D, N) in fp32.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    backend = checked_backend(resolve_backend(backend, u.device), backend, u, A, B, D, z, delta_bias,
                              delta_softplus, return_last_state)
    if backend == "ref":
        fn = selective_scan_ref
    elif backend == "torch":
        from nas.ops.scan_torch import selective_scan_torch as fn
    elif backend == "cpu":
        from nas.ops.scan_cpu import selective_scan_cpu as fn
    else:
        from nas.ops.scan_triton import selective_scan_triton as fn
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
