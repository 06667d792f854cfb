"""A fast scan backend checks itself where it runs, before a model trains on it.

The compiled CPU kernels and the Triton kernels are tested here, but a user's compiler, GPU, driver or Triton
version may build them differently; a miscompiled kernel would train silently on wrong numbers. So the first
use of one runs it on a small random problem against the float64 reference, forward and every gradient:
- ``cpu``: once per process, the scan (grouped B and C, channel tails, D, z, delta_bias, softplus, the last
  state, the N = 16 build and the generic one) and the causal conv, which share one library;
- ``triton``: once per GPU, dtype and option set (each option set is a separate compiled kernel), on a
  problem with the same options: pads through the index table for the multi-direction launch, groups.
A worst error over the dtype's tolerance, or an exception, ends in one warning line naming the backend, the
device, the versions and the worst error, and "auto" runs the torch backend instead; a backend named
explicitly raises that line as a ``UserError``. ``NAS_SELFCHECK=0`` skips the checks. The problems are built
from their own generator, so a check never moves the global random state (resumes stay exact).
"""
from __future__ import annotations

import logging
import os
import platform

import torch

from nas.errors import UserError

log = logging.getLogger(__name__)

# Worst error allowed, relative to the reference's largest magnitude, per input/output dtype. A right kernel
# is 10-100x inside these (rounding of the dtype, the kernels' fp32 exp2); a wrong one is off by O(1).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}

_verdicts: dict[tuple, str] = {}  # key -> "" (passed) or the failure line
_warned: set[str] = set()


def enabled() -> bool:
    return os.environ.get("NAS_SELFCHECK", "1") != "0"


def _versions(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    if device.type == "cuda":
        import triton
        parts.insert(0, torch.cuda.get_device_name(device))
        parts.append(f"triton {triton.__version__}")
    else:
        parts.insert(0, platform.processor() or platform.machine())
    return ", ".join(parts)


def worst_error(run, inputs: dict, reference, seed: int = 0) -> tuple[str, float]:
    """Run ``run(**inputs)`` and ``reference(**inputs in float64)`` forward and backward with the same random
    output gradients; return (name, error) of the worst output or gradient, the error being the largest
    absolute difference over the reference's largest magnitude. Outputs are a tensor or a tuple of them."""
    gen = torch.Generator().manual_seed(seed + 1)
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    leaves64 = {k: v.detach().double().requires_grad_(v.is_floating_point())
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    got, want = run(**leaves), reference(**leaves64)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    grads_out = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want]
    diffs = {f"output {i}": (g.double(), w) for i, (g, w) in enumerate(zip(got, want))}
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g_got = torch.autograd.grad(got, [leaves[k] for k in names], [g.to(o.device, o.dtype) for g, o in zip(grads_out, got)],
                                allow_unused=True)
    g_want = torch.autograd.grad(want, [leaves64[k] for k in names], [g.to(w.device) for g, w in zip(grads_out, want)],
                                 allow_unused=True)
    for k, g, w in zip(names, g_got, g_want):
        if w is not None:
            diffs[f"gradient of {k}"] = (torch.zeros_like(w) if g is None else g.double(), w)
    errors = {k: ((g.cpu() - w.cpu()).abs().max() / w.abs().max().clamp_min(1e-12)).item() for k, (g, w) in diffs.items()}
    errors = {k: (float("inf") if e != e else e) for k, e in errors.items()}  # NaN counts as the worst
    name = max(errors, key=errors.get)
    return name, errors[name]


def _verdict(key: tuple, backend: str, device: torch.device, dtype: torch.dtype, what: str, check) -> str:
    """'' if ``check()`` (-> (name, error)) is within tolerance, else the one-line reason; remembered per key."""
    if key not in _verdicts:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            try:
                name, error = check()
                bad = "" if error <= TOLERANCE[dtype] else (
                    f"is off by {error:.1e} ({name}, tolerance {TOLERANCE[dtype]:.0e}) against the float64 reference")
            except Exception as e:  # noqa: BLE001 - a kernel that does not build or launch here is a failed check
                first = (str(e).strip().splitlines() or [""])[0]
                bad = f"failed: {type(e).__name__}: {first[:200]}"
        _verdicts[key] = "" if not bad else (
            f"self-check: the {backend} backend on {device} ({_versions(device)}; {what}) {bad}")
    return _verdicts[key]


def settle(backend: str, explicit: bool, failure: str) -> str:
    """The backend to run after a check: ``backend`` if it passed; else 'torch' after one warning line, or a
    UserError when the backend was named explicitly."""
    if not failure:
        return backend
    if explicit:
        raise UserError(f"{failure}; use backend='torch' (or NAS_SELFCHECK=0 to run it anyway)")
    if failure not in _warned:
        _warned.add(failure)
        log.warning("%s; using the torch backend instead (NAS_SELFCHECK=0 skips this check)", failure)
    return "torch"


def _random(gen: torch.Generator, *shape, low=-1.0, high=1.0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen) * (high - low) + low


def scan_problem(batch: int, dim: int, L: int, N: int, groups: int, *, D=True, z=True, bias=True,
                 softplus=True, last_state=True, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Random keyword arguments of ``selective_scan``: A negative as in Mamba, delta around softplus's knee.
    groups 0: B and C ungrouped (batch, N, L)."""
    gen = torch.Generator().manual_seed(seed)
    bc = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    x = {"u": _random(gen, batch, dim, L), "delta": _random(gen, batch, dim, L, low=-2.0, high=0.5),
         "A": -torch.exp(_random(gen, dim, N, low=-1.0, high=1.0)), "B": _random(gen, *bc), "C": _random(gen, *bc),
         "D": _random(gen, dim) if D else None, "z": _random(gen, batch, dim, L) if z else None,
         "delta_bias": _random(gen, dim, low=-0.5, high=0.5) if bias else None}
    io = ("u", "delta", "B", "C", "z")
    x = {k: None if v is None else v.to(device, dtype if k in io else torch.float32) for k, v in x.items()}
    return {**x, "delta_softplus": softplus, "return_last_state": last_state}


def cpu_failure() -> str:
    """'' if the compiled CPU kernels (scan and conv) pass their check in this process, else the failure
    line (checked once)."""
    if not enabled():
        return ""
    return _verdict(("cpu",), "cpu", torch.device("cpu"), torch.float32, "scan at N 16 and 5, causal conv",
                    _check_cpu)


def _check_cpu() -> tuple[str, float]:
    from nas.ops import cpu_kernels
    from nas.ops.causal_conv import causal_conv1d_silu_cpu, causal_conv1d_silu_ref
    from nas.ops.scan_cpu import selective_scan_cpu
    from nas.ops.selective_scan import selective_scan_ref

    # channels per group: two vectors and a tail, so full vectors, a partial one and group splits all run
    dim = 2 * (2 * cpu_kernels.lanes(torch.float32) + 3)
    results = [worst_error(selective_scan_cpu, scan_problem(2, dim, 13, N, 2, seed=N), selective_scan_ref, seed=N)
               for N in (16, 5)]  # N 16 is compiled with the state size known, other N share a loop
    gen = torch.Generator().manual_seed(7)
    conv = {"x": _random(gen, 2, 6, 13), "weight": _random(gen, 6, 1, 4), "bias": _random(gen, 6)}
    name, error = worst_error(causal_conv1d_silu_cpu, conv, causal_conv1d_silu_ref)
    results.append((f"causal conv {name}", error))
    return max(results, key=lambda r: r[1])


def triton_options(B, D, z, delta_bias, delta_softplus, return_last_state, index, multi: bool) -> tuple:
    """The names of what selects a compiled Triton kernel variant for a call (its constexpr options), so
    each variant a run uses is checked."""
    flags = {"multi": multi, "index": index is not None, "groups": B.dim() == 4 and not multi, "D": D is not None,
             "z": z is not None, "bias": delta_bias is not None, "softplus": bool(delta_softplus),
             "last": bool(return_last_state)}
    return tuple(name for name, on in flags.items() if on)


def triton_failure(device: torch.device, dtype: torch.dtype, N: int, options: tuple) -> str:
    """'' if the Triton kernels pass their check for this GPU, dtype, state size and option set, else the
    failure line (checked once per key)."""
    if not enabled():
        return ""
    what = f"{str(dtype).replace('torch.', '')}, N {N}, {'+'.join(options) or 'no options'}"
    return _verdict(("triton", str(device), dtype, N, options), "triton", device, dtype, what,
                    lambda: _check_triton(device, dtype, N, options))


def _check_triton(device: torch.device, dtype: torch.dtype, N: int, options: tuple) -> tuple[str, float]:
    from nas.ops import scan_triton
    from nas.ops.multi_scan import multi_direction_scan_torch
    from nas.ops.scan_index import scan_orders
    from nas.ops.selective_scan import selective_scan_ref

    on = {name: name in options for name in ("index", "D", "z", "bias", "softplus")}
    if "multi" not in options:
        x = scan_problem(2, 24, 11, N, 2 if "groups" in options else 0, D=on["D"], z=on["z"], bias=on["bias"],
                         softplus=on["softplus"], last_state="last" in options, dtype=dtype, device=device)
        return worst_error(scan_triton.selective_scan_triton, x, selective_scan_ref)
    # two directions on a 3 x 3 grid: raster order, and 2 x 2 windows, which pad it to 4 x 4
    batch, K, dim, L = 2, 2, 12, 9
    x = scan_problem(batch, K * dim, L, N, K, D=on["D"], z=on["z"], bias=on["bias"], softplus=on["softplus"],
                     last_state=False, dtype=dtype, device=device)
    x = {"u": x["u"].view(batch, K, dim, L), "delta": x["delta"].view(batch, K, dim, L), "A": x["A"].view(K, dim, N),
         "B": x["B"], "C": x["C"], "D": None if x["D"] is None else x["D"].view(K, dim),
         "z": None if x["z"] is None else x["z"].view(batch, K, dim, L),
         "delta_bias": None if x["delta_bias"] is None else x["delta_bias"].view(K, dim), "delta_softplus": on["softplus"],
         "index": scan_orders(["h", "w2"], 3, 3).to(device) if on["index"] else None}
    return worst_error(scan_triton.multi_direction_scan_triton, x,
                       lambda **a: multi_direction_scan_torch(**a, backend="ref"))
