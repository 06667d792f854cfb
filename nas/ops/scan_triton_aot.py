"""Compile the Triton scan kernels ahead of time for an NVIDIA architecture, with no GPU present, and read
what the compiled code costs.

The interpreter checks what the kernels compute, not that they compile. Building them to a cubin for
sm_90 (Hopper) with the ptxas that ships inside the triton wheel does, and the cubin tells the registers,
spill stack and shared memory each kernel needs at a launch config, and (through cuobjdump -sass) the
instructions of its time loop: counted per (channel x step) they are what a static performance model
(benchmarks/kernel_resources.py) multiplies out. None of it is a timing.

    kernel_resources(torch.bfloat16, N=16, Dg=256, S=196, index=True)["backward"]["per_channel_step"]["SHFL"]

`side_triton(version)` finds another Triton release installed beside the pinned one (the GPU machines run
3.6), and `kernel_resources_with(path, ...)` compiles there, in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nas.ops.cpu_kernels import cache_dir
from nas.ops.scan_triton import _tile_shape, backward_maxnreg, forward_tile, launch_config
from nas.ops.scan_triton_kernels import _scan_bwd_kernel, _scan_fwd_kernel

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointers that carry the input/output dtype; every other pointer is fp32 (A, D, bias, checkpoints, last
# state, partial gradients, and the A2 stand-in passed for absent options) except the int32 index table.
_IO_POINTERS = {"u_ptr", "dt_ptr", "z_ptr", "y_ptr", "B_ptr", "C_ptr", "dy_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# The strides that are 1 in the layouts the models hand in: u and z time-contiguous (batch, K, D, L) blocks,
# delta, B and C channel-fastest (einsum outputs), dy token-major like the y it is the gradient of.
MODEL_UNIT_STRIDES = ("su_l", "sz_l", "sdt_d", "sB_n", "sC_n", "sdy_d")
# What the model counts, by SASS opcode (modifiers dropped, except the load/store/atomic widths kept below).
_FP32 = ("FFMA", "FMUL", "FADD")
_MEMORY = ("LDG", "STG", "RED", "REDG", "ATOM", "ATOMG", "LDS", "STS", "LDSM", "STSM")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def toolchain_available(arch: int = 90) -> bool:
    """Whether triton's bundled NVIDIA tools for sm_<arch> (its ptxas, and cuobjdump) are present, as in the
    Linux wheels."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(arch).path).exists() and Path(knobs.nvidia.cuobjdump.path).exists()
    except Exception:  # noqa: BLE001 - a triton without the NVIDIA backend or its binaries
        return False


def _signature(fn, constexprs: dict, io_dtype: torch.dtype, index: bool, z: bool, unit: tuple = ()):
    """The types and alignment facts the runtime would specialize a launch on: sizes stay i32, strides
    named in `unit` are the constant 1 (as a launch with a unit stride there gets). Absent optional inputs
    are the fp32 A2 stand-in. Returns (signature, constexprs with the unit strides, attrs)."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit:
            signature[name], constexprs[name] = "constexpr", 1
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
    return signature, constexprs, attrs


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, str(path)], capture_output=True, text=True,
                              check=True).stdout


def _read_usage(cubin: bytes) -> dict:
    out = _cuobjdump(cubin, "-res-usage")
    match = _USAGE.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    regs, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local, "shared_bytes": shared}


def _op_key(opcode: str) -> str:
    """MUFU.EX2 and memory ops with their width (LDG.E.U16 -> LDG.16, LDG.E.128 -> LDG.128, LDG.E -> LDG.32);
    every other opcode without its modifiers."""
    parts = opcode.split(".")
    if parts[0] == "MUFU":
        return opcode
    if parts[0] in _MEMORY:
        widths = [p.lstrip("SU") for p in parts[1:] if p.lstrip("SU").isdigit()]
        return f"{parts[0]}.{widths[-1] if widths else 32}"
    return parts[0]


def loop_counts(sass: str) -> dict:
    """Instruction counts of the time loop: the outermost loop (a backward BRA) holding an exponential
    (MUFU.EX2). Counts by `_op_key`, plus group totals: FP32 (FFMA + FMUL + FADD), MUFU, SHFL, BAR, LDG,
    STG, atomics (RED + ATOM), local memory (LDL + STL: spills) and every instruction (total). NOPs and
    the loop's own branch are left out."""
    lines = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    instrs = [(a, op) for a, op, _ in lines]
    loops = []
    for addr, op, rest in lines:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            loops.append((int(target.group(1), 16), addr))
    with_exp = [(lo, hi) for lo, hi in loops
                if any(lo <= a <= hi and op.startswith("MUFU.EX2") for a, op in instrs)]
    if not with_exp:
        raise RuntimeError("no loop with an exponential (MUFU.EX2) in the SASS")
    lo, hi = min(with_exp, key=lambda r: (r[0], -r[1]))
    body = Counter(_op_key(op) for a, op in instrs if lo <= a < hi and op != "NOP")
    groups = {
        "FP32": sum(body[k] for k in _FP32),
        "MUFU": sum(v for k, v in body.items() if k.startswith("MUFU")),
        "SHFL": body["SHFL"], "BAR": body["BAR"],
        "LDG": sum(v for k, v in body.items() if k.startswith("LDG.")),
        "STG": sum(v for k, v in body.items() if k.startswith("STG.")),
        "atomics": sum(v for k, v in body.items() if k.startswith(("RED", "ATOM"))),
        "local": body["LDL"] + body["STL"],
        "total": sum(body.values()),
    }
    return {**groups, **{k: v for k, v in sorted(body.items())}}


def compile_kernel(fn, constexprs: dict, io_dtype: torch.dtype, index: bool, z: bool, num_warps: int,
                   arch: int = 90, unit: tuple = (), maxnreg: int | None = None) -> dict:
    """Compile one kernel for sm_<arch> (maxnreg: a register cap, as the launch passes); its registers, spill
    stack, local and shared memory (bytes), its PTX (key `ptx`) and its time loop's instruction counts (`loop`,
    see `loop_counts`)."""
    signature, constexprs, attrs = _signature(fn, constexprs, io_dtype, index, z, unit)
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    if maxnreg:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    return {**_read_usage(cubin), "ptx": compiled.asm["ptx"], "loop": loop_counts(_cuobjdump(cubin, "-sass"))}


def per_channel_step(loop: dict, channels_per_program: int, steps_per_iteration: int, num_warps: int) -> dict:
    """Warp instructions per (channel x step): a loop iteration runs `steps_per_iteration` steps of the
    program's channels on `num_warps` warps."""
    scale = num_warps / (channels_per_program * steps_per_iteration)
    return {k: round(v * scale, 4) for k, v in loop.items()}


def kernel_resources(io_dtype: torch.dtype = torch.float32, N: int = 16, Dg: int = 256, S: int = 196,
                     index: bool = False, D: bool = True, z: bool = True, delta_bias: bool = True,
                     softplus: bool = True, dlast: bool = False, config: tuple[int, int] | None = None,
                     arch: int = 90, unit: tuple = MODEL_UNIT_STRIDES) -> dict:
    """Compile forward and backward for sm_<arch> as a launch with these options would (the strides in
    `unit` equal to 1), and read each one's resources, PTX and time-loop instruction counts.

    io_dtype: dtype of u/delta/z/B/C; N: d_state; Dg: channels per group (per direction); S: scan length;
    index: the multi-direction launch (reads through a scan-order table); dlast: the backward takes a
    gradient of the last state; config: (BLOCK_D, T), default
    `launch_config`'s choice for a GPU.
    Returns {"config": [BLOCK_D, T], "forward": {...}, "backward": {...}}, each kernel with `registers`,
    `stack_bytes`, `local_bytes`, `shared_bytes`, `ptx`, `loop`, `channels_per_program` (the forward's tile
    may be wider: scan_triton.forward_tile) and `per_channel_step` (`loop` per channel and step).
    """
    if io_dtype not in _TRITON_TYPES:
        raise ValueError(f"io_dtype: expected one of {sorted(map(str, _TRITON_TYPES))}, got {io_dtype}")
    block_d, T = config or launch_config(Dg, N, S, interpret=False)
    NP = triton.next_power_of_2(N)
    # bf16 B and C with unit state strides are read as pairs, as a launch with such tensors is (_bc_pairs)
    pairs = io_dtype == torch.bfloat16 and N % 2 == 0 and {"sB_n", "sC_n"} <= set(unit)
    common = dict(N=N, NP=NP, T=T, HAS_D=D, HAS_Z=z, HAS_BIAS=delta_bias, SOFTPLUS=softplus, HAS_INDEX=index,
                  BC_PAIRS=pairs)
    tiles = {"forward": forward_tile(block_d, NP), "backward": _tile_shape(block_d, NP)}
    kernels = {
        "forward": (_scan_fwd_kernel, dict(common, SAVE_CKPT=True, CKW=block_d)),
        "backward": (_scan_bwd_kernel, dict(common, HAS_DLAST=dlast, ATOMIC_BC=triton.cdiv(Dg, block_d) > 1)),
    }
    out = {"config": [block_d, T]}
    for name, (fn, constexprs) in kernels.items():
        kc, cl = tiles[name]
        res = compile_kernel(fn, dict(constexprs, KC=kc, CL=cl), io_dtype, index, z, 1, arch, unit,
                             backward_maxnreg(NP, io_dtype) if name == "backward" else None)
        res["channels_per_program"] = kc * cl
        res["per_channel_step"] = per_channel_step(res["loop"], kc * cl, T, 1)
        out[name] = res
    return out


def side_triton(version: str = "3.6.0") -> Path | None:
    """The folder of a Triton `version` installed beside the pinned one (pip install --no-deps --target), from
    $NAS_TRITON_<major><minor> (e.g. NAS_TRITON_36) or <cache>/triton-<version>; None where there is none."""
    major, minor = version.split(".")[:2]
    env = os.environ.get(f"NAS_TRITON_{major}{minor}")
    path = Path(env) if env else cache_dir() / f"triton-{version}"
    return path if (path / "triton" / "__init__.py").exists() else None


def install_side_triton(version: str = "3.6.0") -> Path:
    """pip-install triton==`version` (no dependencies) into <cache>/triton-<version>; returns the folder.
    Raises RuntimeError with pip's last line when it cannot (no network, no wheel for this platform)."""
    path = cache_dir() / f"triton-{version}"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(path),
                           f"triton=={version}"], capture_output=True, text=True)
    if proc.returncode != 0 or side_triton(version) is None:
        raise RuntimeError(f"pip could not install triton=={version} into {path}: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return path


def kernel_resources_with(triton_dir: Path, **kwargs) -> dict:
    """`kernel_resources(**kwargs)` compiled by the Triton in `triton_dir`, in a subprocess (a process holds
    one triton). io_dtype goes by name ("bf16", "fp16", "fp32"). Adds `triton`: that Triton's version."""
    root = Path(__file__).resolve().parents[2]
    code = ("import json, sys, torch, triton\n"
            "from nas.ops.scan_triton_aot import kernel_resources\n"
            "kw = json.loads(sys.argv[1])\n"
            "kw['io_dtype'] = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[kw['io_dtype']]\n"
            "out = kernel_resources(**kw)\n"
            "out['triton'] = triton.__version__\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(triton_dir), str(root)])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling with the Triton in {triton_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
