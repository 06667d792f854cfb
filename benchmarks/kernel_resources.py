"""The Triton scan kernels compiled for sm_90: registers, spills, and a static performance model; no GPU needed.

Runs on any machine with the triton wheel (its bundled ptxas and cuobjdump). Two records:

1. kernel_resources_sm<arch>.json: registers and spill stack of forward and backward (multi-direction launch
   with every option, d_inner 256, L 196) at the default launch config for d_state 1, 4, 16, 64 (bf16 and
   fp32), and at d_state 16 for T = 2, 4, 8 steps per checkpoint.
2. kernel_model_sm<arch>.json: the time loop's SASS instructions per (channel x step), counted in warp
   instructions (one warp instruction serves 32 lanes), for this kernel, the same kernel compiled by a side
   install of Triton 3.6 (the GPU machines' version) where one is found or --side-triton installs it, and
   the kernel it replaced (compiled from git history, commit OLD_COMMIT). From them and H100's published
   rates (132 SMs at 1.755 GHz; per SM and clock 16 MUFU, 128 FP32, 32 SHFL lanes and 4 warp instructions
   issued; 3.35 TB/s HBM) it estimates the forward and backward of two layers, batch 128, bf16: a LocalVim-T
   search layer and a LocalVMamba-T stage-1 layer (sizes from the model configs). Each estimate is the largest
   of: MUFU, FP32, SHFL and issue time of the executed loop instructions, and HBM time of the bytes the kernel
   must move (inputs read once, outputs and checkpoints written once, one fp32 atomic per dB/dC element per
   channel tile); `pipes_only_ms` is the same without the issue limit. The floor is the exponentials
   alone: one per (batch, channel, step, state) per pass, one pass forward and two backward (the recompute and
   the adjoint), at 16 per SM and clock. An estimate, never a timing: it ignores latency, occupancy, caches.

Prints tables and writes both records to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import environment  # noqa: E402
from nas.ops import scan_triton_aot as aot  # noqa: E402
from nas.ops.scan_triton import _tile_shape, forward_tile, launch_config  # noqa: E402

OLD_COMMIT = "abd75f20d0dfcf75704253eaa6d01fc595cc1be0"  # the chunked associative-scan kernels
OLD_CONFIG = (8, 16, 4)  # their launch config at d_state 16: BLOCK_D, T, num_warps
H100 = {"sms": 132, "clock_hz": 1.755e9, "MUFU": 16, "FP32": 128, "SHFL": 32, "issue": 128, "hbm_bytes_s": 3.35e12}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IO_BYTES = 2  # bf16
DG, S = 256, 196


def model_shapes() -> dict:
    """The two layers the model estimates, batch 128, from the model configs."""
    from nas.models import create_model

    vim = create_model("local_vim_tiny_search").config
    vss = create_model("local_vssm_tiny").config
    grid = vss["img_size"] // vss["patch_size"]
    vim_L = (vim["img_size"] // vim["patch_size"]) ** 2 + 1  # the middle class token scans with the patches
    return {
        "localvim_t_search": {"batch": 128, "K": 8, "d_inner": vim["expand"] * vim["embed_dim"], "N": vim["d_state"],
                              "L": vim_L},
        "localvmamba_t_stage1": {"batch": 128, "K": vss["scans_per_layer"],
                                 "d_inner": int(vss["ssm_ratio"] * vss["dims"][0]), "N": vss["d_state"],
                                 "L": grid * grid},
    }


def old_kernels(tmp: Path):
    """The replaced kernel module, from git history, imported from a temporary file."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:nas/ops/scan_triton.py"], capture_output=True,
                         text=True, check=True).stdout
    path = tmp / "old_scan_triton.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_scan_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_counts(tmp: Path) -> dict:
    module = old_kernels(tmp)
    block_d, T, warps = OLD_CONFIG
    common = dict(N=16, NP=16, BLOCK_D=block_d, T=T, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True,
                  HAS_INDEX=True)
    out = {"config": list(OLD_CONFIG), "commit": OLD_COMMIT}
    for name, fn, extra in (("forward", module._scan_fwd_kernel, dict(SAVE_CKPT=True, SAVE_LAST=False)),
                            ("backward", module._scan_bwd_kernel, dict(ATOMIC_BC=True))):
        res = aot.compile_kernel(fn, {**common, **extra}, torch.bfloat16, True, True, warps)
        res.pop("ptx")
        res["per_channel_step"] = aot.per_channel_step(res["loop"], block_d, T, warps)
        out[name] = res
    return out


def new_counts(side: Path | None) -> dict:
    """This kernel at the LocalVim-T search layer's launch (bf16, every option, index table), pinned Triton,
    and the side Triton where there is one."""
    kw = dict(N=16, Dg=DG, S=S, index=True)
    res = aot.kernel_resources(torch.bfloat16, **kw)
    for k in ("forward", "backward"):
        res[k].pop("ptx")
    res["triton"] = triton.__version__
    out = {"this": res}
    if side is not None:
        other = aot.kernel_resources_with(side, io_dtype="bf16", **kw)
        for k in ("forward", "backward"):
            other[k].pop("ptx")
        out[f"this_triton_{other['triton']}"] = other
    return out


def traffic(shape: dict, block_d: int, T: int, ckpt_np: int, partials: int) -> dict:
    """HBM bytes each kernel must move at `shape` (bf16 I/O, fp32 checkpoints, and `partials` fp32 atomic adds
    per channel tile to each dB/dC element)."""
    b, K, Dg, N, L = (shape[k] for k in ("batch", "K", "d_inner", "N", "L"))
    tiles, chunks = triton.cdiv(Dg, block_d), triton.cdiv(L, T)
    chan = b * K * Dg * L * IO_BYTES  # one (batch, K, d_inner, L) tensor
    bc = b * K * N * L * IO_BYTES  # one of B, C
    ckpt = b * K * tiles * block_d * ckpt_np * chunks * 4
    atomics = 2 * b * K * tiles * partials * N * L * 4
    return {"forward": 4 * chan + 2 * bc + ckpt,  # u, delta, z in; y out
            "backward": 7 * chan + 2 * bc + ckpt + atomics}  # u, delta, z, dy in; du, ddelta, dz out


def estimate(per_step: dict, shape: dict, block_d: int, T: int, nbytes: int, passes: int) -> dict:
    """Time bounds (ms) of one kernel at `shape`: pipes from the executed warp instructions, HBM from bytes."""
    b, K, Dg, N, L = (shape[k] for k in ("batch", "K", "d_inner", "N", "L"))
    steps = b * K * triton.cdiv(Dg, block_d) * block_d * triton.cdiv(L, T) * T  # padded (channel x step)s run
    rate = H100["sms"] * H100["clock_hz"]
    pipes = {"MUFU": per_step["MUFU"], "FP32": per_step["FP32"], "SHFL": per_step["SHFL"], "issue": per_step["total"]}
    bounds = {k: 1e3 * v * steps * 32 / (H100[k] * rate) for k, v in pipes.items()}
    bounds["HBM"] = 1e3 * nbytes / H100["hbm_bytes_s"]
    floor = 1e3 * passes * b * K * Dg * L * N / (H100["MUFU"] * rate)
    bound = max(bounds, key=bounds.get)
    # without the issue limit: the pipes and HBM alone, as the issue that asked for this model counted them
    pipes_only = max(v for k, v in bounds.items() if k != "issue")
    return {"estimate_ms": round(bounds[bound], 4), "floor_ms": round(floor, 4),
            "estimate_over_floor": round(bounds[bound] / floor, 2), "bound": bound,
            "bounds_ms": {k: round(v, 4) for k, v in bounds.items()}, "pipes_only_ms": round(pipes_only, 4)}


def model(kernels: dict, shapes: dict) -> dict:
    out = {}
    for sname, shape in shapes.items():
        out[sname] = {}
        for kname, k in kernels.items():
            NP = triton.next_power_of_2(shape["N"])
            if kname == "old":
                (block_d, T, _), partials = k["config"], 1
                fwd_block = block_d
            else:
                block_d, T = launch_config(shape["d_inner"], shape["N"], shape["L"], interpret=False)
                kc, cl = _tile_shape(block_d, NP)
                # one dB/dC partial per tile where the lane butterfly adds the KC halves, else one per half
                partials = 1 if kc * cl == 32 and NP <= cl else kc
                fwd_block = math.prod(forward_tile(block_d, NP))
            nbytes = traffic(shape, block_d, T, NP, partials)
            fwd = estimate(k["forward"]["per_channel_step"], shape, fwd_block, T, nbytes["forward"], 1)
            bwd = estimate(k["backward"]["per_channel_step"], shape, block_d, T, nbytes["backward"], 2)
            total = {"estimate_ms": round(fwd["estimate_ms"] + bwd["estimate_ms"], 4),
                     "floor_ms": round(fwd["floor_ms"] + bwd["floor_ms"], 4),
                     "pipes_only_ms": round(fwd["pipes_only_ms"] + bwd["pipes_only_ms"], 4)}
            total["estimate_over_floor"] = round(total["estimate_ms"] / total["floor_ms"], 2)
            total["pipes_only_over_floor"] = round(total["pipes_only_ms"] / total["floor_ms"], 2)
            total["bound"] = f"forward {fwd['bound']}, backward {bwd['bound']}"
            out[sname][kname] = {"forward": fwd, "backward": bwd, "forward_backward": total}
    return out


def resource_row(dname, N, config, arch):
    res = aot.kernel_resources(DTYPES[dname], N=N, Dg=DG, S=S, index=True, config=config, arch=arch)
    block_d, T = res["config"]
    out = {"dtype": dname, "N": N, "block_d": block_d, "T": T, "num_warps": 1,
           "default": tuple(res["config"]) == launch_config(DG, N, S, False)}
    for kernel in ("forward", "backward"):
        out.update({f"{kernel}_{k}": v for k, v in res[kernel].items() if k not in ("ptx", "loop", "per_channel_step")})
        out[f"{kernel}_shfl_per_channel_step"] = res[kernel]["per_channel_step"]["SHFL"]
    print(f"{dname:5s} N={N:<3d} {block_d:4d} x {T:2d}  fwd {out['forward_registers']:3d} regs "
          f"{out['forward_stack_bytes']:5d} B stack   bwd {out['backward_registers']:3d} regs "
          f"{out['backward_stack_bytes']:5d} B stack{'   (default)' if out['default'] else ''}", flush=True)
    return out


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer, e.g. 90 for sm_90")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="folder of the two JSON records")
    p.add_argument("--skip-resources", action="store_true", help="only the model (the first record takes minutes)")
    p.add_argument("--side-triton", default="3.6.0",
                   help="also compile with this Triton, installed beside the pinned one (pip, once; '' to skip)")
    args = p.parse_args()
    if not aot.toolchain_available(args.arch):
        sys.exit("kernel_resources: triton's bundled ptxas/cuobjdump are missing (install the Linux triton wheel)")
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = subprocess.run([get_ptxas(args.arch).path, "--version"], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    env = {**environment("cpu"), "target": f"sm_{args.arch}", "ptxas": ptxas}
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir = Path(args.out_dir)

    side = None
    if args.side_triton:
        side = aot.side_triton(args.side_triton)
        if side is None:
            try:
                side = aot.install_side_triton(args.side_triton)
            except RuntimeError as e:
                print(f"no Triton {args.side_triton} beside the pinned one: {e}")
    shapes = model_shapes()
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {**new_counts(side), "old": old_counts(Path(tmp))}
    estimates = model(kernels, shapes)
    keys = ("MUFU", "FP32", "SHFL", "BAR", "LDG", "STG", "atomics", "local", "total")
    print("\nwarp instructions per (channel x step) in the time loop")
    print(f"{'kernel':32s} {'regs':>4s} {'stack':>5s} " + " ".join(f"{k:>7s}" for k in keys))
    for kname, k in kernels.items():
        for part in ("forward", "backward"):
            pcs = k[part]["per_channel_step"]
            print(f"{kname + ' ' + part:32s} {k[part]['registers']:4d} {k[part]['stack_bytes']:5d} "
                  + " ".join(f"{pcs[x]:7.3f}" for x in keys))
    print("\nestimates (H100 model, batch 128, bf16; not timings)")
    for sname, per in estimates.items():
        for kname, e in per.items():
            for part in ("forward", "backward", "forward_backward"):
                r = e[part]
                print(f"{sname:22s} {kname:18s} {part:17s} {r['estimate_ms']:8.3f} ms  floor {r['floor_ms']:6.3f} ms "
                      f"{r['estimate_over_floor']:6.2f}x  {r['bound']:32s} without issue {r['pipes_only_ms']:7.3f} ms")
    write(out_dir / f"kernel_model_sm{args.arch}.json",
          {"benchmark": "kernel_model", "environment": env, "date": date, "device_model": H100, "shapes": shapes,
           "note": "static estimates from compiled SASS; not measured times",
           "kernels": {k: {part: {x: v[part][x] for x in ("registers", "stack_bytes", "per_channel_step")}
                           for part in ("forward", "backward")} | {"config": v["config"]}
                       for k, v in kernels.items()},
           "estimates": estimates})
    if args.skip_resources:
        return
    print("\ndefault launch configs, multi-direction launch, d_inner 256, L 196")
    defaults = [resource_row(d, N, None, args.arch) for d in DTYPES for N in (1, 4, 16, 64)]
    print("\nsteps per checkpoint at d_state 16, bf16")
    sweep = [resource_row("bf16", 16, (32, t), args.arch) for t in (2, 8)]
    write(out_dir / f"kernel_resources_sm{args.arch}.json",
          {"benchmark": "kernel_resources", "environment": env, "date": date, "shape": {"d_inner": DG, "L": S},
           "defaults": defaults, "sweep": sweep})


if __name__ == "__main__":
    main()
