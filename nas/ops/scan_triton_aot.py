"""Compile the Triton scan kernels ahead of time for an NVIDIA architecture, with no GPU present.

The interpreter checks what the kernels compute, not that they compile. Building them to a cubin for
sm_90 (Hopper) with the ptxas that ships inside the triton wheel does, and the cubin tells the
registers, spill stack and shared memory each kernel needs at a launch config. That is what tests
and `benchmarks/kernel_resources.py` read; it says nothing about speed.

    kernel_resources(torch.bfloat16, N=16, Dg=256, S=196, index=True)["backward"]["stack_bytes"]
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nas.ops.scan_triton import _scan_bwd_kernel, _scan_fwd_kernel, launch_config

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointers that carry the input/output dtype; every other pointer is fp32 (A, D, bias, checkpoints,
# partial gradients, and the A2 stand-in passed for absent options) except the int32 index table.
_IO_POINTERS = {"u_ptr", "dt_ptr", "z_ptr", "y_ptr", "B_ptr", "C_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def toolchain_available(arch: int = 90) -> bool:
    """Whether triton's bundled NVIDIA tools for sm_<arch> (its ptxas, and cuobjdump) are present, as in the
    Linux wheels."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(arch).path).exists() and Path(knobs.nvidia.cuobjdump.path).exists()
    except Exception:  # noqa: BLE001 - a triton without the NVIDIA backend or its binaries
        return False


def _signature(fn, constexprs: dict, io_dtype: torch.dtype, index: bool, z: bool):
    """The types and alignment facts the runtime would specialize a launch on (all ints stay i32:
    the kernels mark them do_not_specialize). Absent optional inputs are the fp32 A2 stand-in."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name == "idx_ptr" and index:
                kind = "i32"
            elif name in _IO_POINTERS and (name not in ("z_ptr", "dz_ptr") or z):
                kind = _TRITON_TYPES[io_dtype]
            else:
                kind = "fp32"
            signature[name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "i32"
    return signature, attrs


def _read_usage(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    match = _USAGE.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    regs, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local, "shared_bytes": shared}


def kernel_resources(io_dtype: torch.dtype = torch.float32, N: int = 16, Dg: int = 256, S: int = 196,
                     index: bool = False, D: bool = True, z: bool = True, delta_bias: bool = True,
                     softplus: bool = True, config: tuple[int, int, int] | None = None, arch: int = 90) -> dict:
    """Compile forward and backward for sm_<arch> as a launch with these options would, and read the
    registers per thread, spill stack, local and shared memory (bytes) of each from its cubin.

    io_dtype: dtype of u/delta/z/B/C; N: d_state; Dg: channels per group (per direction); S: scan
    length; index: the multi-direction launch (reads through a scan-order table); config:
    (BLOCK_D, T, num_warps), default `launch_config`'s choice for a GPU.
    Returns {"config": [BLOCK_D, T, num_warps], "forward": {...}, "backward": {...}}.
    """
    if io_dtype not in _TRITON_TYPES:
        raise ValueError(f"io_dtype: expected one of {sorted(map(str, _TRITON_TYPES))}, got {io_dtype}")
    block_d, T, warps = config or launch_config(Dg, N, S, interpret=False)
    common = dict(N=N, NP=triton.next_power_of_2(N), BLOCK_D=block_d, T=T, HAS_D=D, HAS_Z=z,
                  HAS_BIAS=delta_bias, SOFTPLUS=softplus, HAS_INDEX=index)
    kernels = {
        "forward": (_scan_fwd_kernel, dict(common, SAVE_CKPT=True, SAVE_LAST=False)),
        "backward": (_scan_bwd_kernel, dict(common, ATOMIC_BC=triton.cdiv(Dg, block_d) > 1)),
    }
    target = GPUTarget("cuda", arch, 32)
    out = {"config": [block_d, T, warps]}
    for name, (fn, constexprs) in kernels.items():
        signature, attrs = _signature(fn, constexprs, io_dtype, index, z)
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                                  options={"num_warps": warps, "enable_fp_fusion": True})
        out[name] = _read_usage(compiled.asm["cubin"])
    return out
