"""Registers and spill stack of the Triton scan kernels compiled for an NVIDIA architecture (default sm_90).

Runs on any machine with the triton wheel (its bundled ptxas and cuobjdump); no GPU needed. It compiles the
forward and backward of the multi-direction launch (index table, D, z, delta_bias, softplus) at the search
layer shape (d_inner 256, L 196):
  1. the default launch config for every padded d_state 1..64, bf16 and fp32;
  2. a sweep of (BLOCK_D, T, num_warps) at d_state 16, bf16.
These are compile-time facts (what a launch config costs in registers, whether it spills), not timings: the
launch configs are chosen to avoid spills until a GPU times them (bench_scan.py --device cuda --configs).

Prints a table and writes benchmarks/results/kernel_resources_sm<arch>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import environment  # noqa: E402
from nas.ops.scan_triton import launch_config  # noqa: E402
from nas.ops.scan_triton_aot import kernel_resources, toolchain_available  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DG, S = 256, 196


def row(dname, N, config, arch):
    res = kernel_resources(DTYPES[dname], N=N, Dg=DG, S=S, index=True, config=config, arch=arch)
    block_d, T, warps = res["config"]
    per_thread = block_d * triton.next_power_of_2(N) * T / (32 * warps)
    out = {"dtype": dname, "N": N, "block_d": block_d, "T": T, "num_warps": warps,
           "state_tile_elems_per_thread": per_thread, "default": tuple(res["config"]) == launch_config(DG, N, S, False)}
    for kernel in ("forward", "backward"):
        out.update({f"{kernel}_{k}": v for k, v in res[kernel].items()})
    print(f"{dname:5s} N={N:<3d} {block_d:4d} x {T:3d} x {warps}w  {per_thread:5.1f}/thread  "
          f"fwd {out['forward_registers']:3d} regs {out['forward_stack_bytes']:5d} B stack   "
          f"bwd {out['backward_registers']:3d} regs {out['backward_stack_bytes']:5d} B stack"
          f"{'   (default)' if out['default'] else ''}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer, e.g. 90 for sm_90")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel_resources_sm<arch>.json)")
    args = p.parse_args()
    if not toolchain_available(args.arch):
        sys.exit("kernel_resources: triton's bundled ptxas/cuobjdump are missing (install the Linux triton wheel)")
    from triton.backends.nvidia.compiler import get_ptxas

    print("default launch configs, multi-direction launch, d_inner 256, L 196")
    defaults = [row(d, N, None, args.arch) for d in DTYPES for N in (1, 2, 4, 8, 16, 32, 64)]
    print("\nsweep at d_state 16, bf16")
    sweep = [row("bf16", 16, (bd, t, w), args.arch)
             for bd, t, w in itertools.product((2, 4, 8, 16, 32), (8, 16, 32), (2, 4, 8))
             if 2 <= bd * 16 * t / (32 * w) <= 64]
    ptxas = subprocess.run([get_ptxas(args.arch).path, "--version"], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    env = {**environment("cpu"), "target": f"sm_{args.arch}", "ptxas": ptxas}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernel_resources_sm{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "kernel_resources", "environment": env,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "shape": {"d_inner": DG, "L": S},
                               "defaults": defaults, "sweep": sweep}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
