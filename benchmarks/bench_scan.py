"""Benchmark the selective scan: forward and forward+backward time and peak memory per backend.

CPU (default): the "cpu" backend (the compiled kernel, when a C compiler is there) and the "torch" backend
against the usual CPU fallback (precompute exp(delta*A) and delta*B*u
for every step, then a Python loop over L under autograd), fp32 with z, D, delta_bias and softplus, at
(batch 8, D 256, N 16, L 196) and (batch 2, D 384, N 16, L 1024). Each variant runs in its own
subprocess so that its peak resident memory can be read (ru_maxrss minus the RSS before the first call).

CUDA (--device cuda): one layer's K directions on a 14 x 14 grid, inputs in raster order,
  (a) our fused multi-direction Triton launch, tokens read through the scan-order tables;
  (b) our single Triton scan called K times on permuted copies (gather, scan, undo);
  (c) mamba_ssm's CUDA selective_scan_fn called K times on permuted copies (the LocalMamba way), when
      importable (see --mamba-src);
  (d) the torch backend (gather, one grouped scan, scatter);
at the search shape (batch 128, d_inner 256, 8 directions) and the derived shape (d_inner 384, 4
directions), bf16 and fp32; plus the floor: max(bytes that must move / measured copy bandwidth,
exponentials / measured exp2 throughput). --configs adds fused launch configs to the table.

--device interpret runs the CUDA path on CPU under TRITON_INTERPRET=1 at tiny sizes: a check of this script
(tests run it), not a measurement.

Prints a table and writes a JSON record (device, versions, results) to benchmarks/results/, row by row as
they are measured (``complete`` true once it finished).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import Record, check_interpret_env, current_rss_kb, environment  # noqa: E402
from nas.ops import apply_scan, multi_direction_scan, scan_orders, selective_scan, undo_scan  # noqa: E402

CPU_SHAPES = [(8, 256, 16, 196), (2, 384, 16, 1024)]
CPU_VARIANTS = ("fallback_loop", "torch", "cpu")
SEARCH_DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")
DERIVED_DIRECTIONS = ("h", "v_flip", "w7", "w7_flip")  # LocalVim-T's first searched layer
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fallback_scan(u, delta, A, B, C, D, z, delta_bias):
    """The usual CPU fallback: exp(delta*A) and delta*B*u for all steps up front, loop over L."""
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None])
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    inp = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return (torch.stack(ys, dim=2) + D[:, None] * u) * torch.nn.functional.silu(z)


def cpu_inputs(batch, dim, N, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-torch.exp(0.5 * r(dim, N)),
                B=r(batch, N, L), C=r(batch, N, L), D=r(dim), z=r(batch, dim, L), delta_bias=0.3 * r(dim))


def cpu_call(variant, x):
    if variant == "fallback_loop":
        return fallback_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                          delta_softplus=True, backend=variant)



def cpu_child(variant, shape, mode, reps):
    """Runs in a fresh process: peak memory of the first call, then median time of `reps` calls."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    x = cpu_inputs(*shape)
    if mode == "fwdbwd":
        for t in x.values():
            t.requires_grad_()
    dy = torch.randn(shape[0], shape[1], shape[3])

    def step():
        if mode == "fwd":
            with torch.no_grad():
                cpu_call(variant, x)
        else:
            cpu_call(variant, x).backward(dy)
            for t in x.values():
                t.grad = None

    base = current_rss_kb()
    step()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "peak_mb": peak_mb}


def run_cpu(args, record):
    from nas.ops import cpu_kernels
    variants = CPU_VARIANTS if cpu_kernels.available() else CPU_VARIANTS[:-1]
    rows = []
    for shape in CPU_SHAPES:
        for mode in ("fwd", "fwdbwd"):
            for variant in variants:
                reps = args.reps if variant != "fallback_loop" else max(1, args.reps // 3)
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--shape", ",".join(map(str, shape)),
                                      "--mode", mode, "--reps", str(reps)], capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(record.add("rows", {"shape": dict(zip(("batch", "dim", "N", "L"), shape)), "mode": mode,
                                                "variant": variant, **res}))
                print(f"{str(shape):22s} {mode:7s} {variant:14s} {res['ms']:10.1f} ms {res['peak_mb']:9.1f} MB", flush=True)
    summary = []
    for shape in CPU_SHAPES:
        for mode in ("fwd", "fwdbwd"):
            pick = {r["variant"]: r for r in rows if r["mode"] == mode and tuple(r["shape"].values()) == shape}
            entry = {"shape": list(shape), "mode": mode}
            for v in variants[1:]:
                entry[f"{v}_speedup_vs_fallback"] = pick["fallback_loop"]["ms"] / pick[v]["ms"]
                entry[f"{v}_peak_mem_ratio_vs_fallback"] = pick[v]["peak_mb"] / max(pick["fallback_loop"]["peak_mb"], 1e-9)
            if "cpu" in pick:
                entry["cpu_speedup_vs_torch"] = pick["torch"]["ms"] / pick["cpu"]["ms"]
            summary.append(entry)
    print("\nshape                  mode    " + "".join(f" {v + ' speedup':>14s} {v + '/fallback mem':>19s}"
                                                     for v in variants[1:])
          + (f" {'cpu/torch speedup':>18s}" if "cpu" in variants else ""))
    for s in summary:
        print(f"{str(tuple(s['shape'])):22s} {s['mode']:7s}" + "".join(
            f" {s[v + '_speedup_vs_fallback']:13.1f}x {s[v + '_peak_mem_ratio_vs_fallback']:19.2f}" for v in variants[1:])
            + (f" {s['cpu_speedup_vs_torch']:17.1f}x" if "cpu_speedup_vs_torch" in s else ""))
    record.update(summary=summary)


# ----------------------------------------------------------------------------------------------- CUDA
# The same code runs with --device interpret: on CPU under TRITON_INTERPRET=1, at tiny sizes, so that
# tests can run this script's GPU path end to end. Its numbers measure nothing.

TENSOR_DEVICE = {"cuda": "cuda", "interpret": "cpu"}
GRID = {"cuda": (14, 14), "interpret": (7, 7)}  # 7 x 7 still pads the 2 x 2 windows
SIZES = {"cuda": {"search": 256, "derived": 384, "N": 16}, "interpret": {"search": 4, "derived": 6, "N": 4}}


def gpu_time_ms(fn, device, warmup=3, reps=10):
    """Median time of fn() in ms: CUDA events on a GPU, the wall clock under the interpreter."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def measure_ceilings(device):
    """Device-to-device copy bandwidth (bytes read + written) and exp2 throughput of the GPU."""
    import triton
    import triton.language as tl

    tensor_dev = TENSOR_DEVICE[device]
    src = torch.randn(512 * 2**20 if device == "cuda" else 2**20, device=tensor_dev)  # 2 GiB on a GPU
    dst = torch.empty_like(src)
    copy_ms = gpu_time_ms(lambda: dst.copy_(src), device, reps=20)
    bandwidth = 2 * src.numel() * 4 / (copy_ms * 1e-3)

    @triton.jit
    def exp_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(ITERS):
            x = tl.exp2(x * -0.5)  # one MUFU.EX2 per element per iteration, plus one multiply
            acc += x
        tl.store(out_ptr + offs, acc)

    n, iters, block = (132 * 2048 * 16, 512, 1024) if device == "cuda" else (256, 4, 128)
    x = torch.rand(n, device=tensor_dev)
    out = torch.empty_like(x)
    exp_ms = gpu_time_ms(lambda: exp_kernel[(n // block,)](x, out, ITERS=iters, BLOCK=block, num_warps=4), device,
                         reps=10)
    return {"copy_bytes_per_s": bandwidth, "exp2_per_s": n * iters / (exp_ms * 1e-3)}


MAMBA_NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--threads", "4"]


def build_mamba_extension(src):
    """Build (or reuse) only mamba_ssm's selective-scan extension from an unpacked source distribution,
    for this GPU's architecture, and register it as the `selective_scan_cuda` module its Python imports."""
    from torch.utils import cpp_extension

    csrc = Path(src) / "csrc" / "selective_scan"
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    build_dir = Path(os.environ.get("MAMBA_BUILD_DIR", Path(src) / "build_selective_scan"))
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(csrc / "selective_scan.cpp")] + sorted(str(f) for f in csrc.glob("selective_scan_*.cu"))
    module = cpp_extension.load("selective_scan_cuda", sources, build_directory=str(build_dir),
                                extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=MAMBA_NVCC_FLAGS,
                                extra_include_paths=[str(csrc)], verbose=False)
    sys.modules["selective_scan_cuda"] = module


def load_mamba(src):
    """mamba_ssm's selective_scan_fn from an unpacked source tree (its extension built on demand), or None."""
    if src:
        import types
        build_mamba_extension(src)
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(Path(src) / "mamba_ssm")]  # skip mamba_ssm/__init__, which imports every model
        sys.modules.setdefault("mamba_ssm", pkg)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn
    except Exception as exc:  # noqa: BLE001 - report why the baseline is missing, keep benchmarking
        print(f"mamba_ssm selective_scan_fn not available: {exc!r}")
        return None


def layer_inputs(batch, K, dim, N, L, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device=device, dtype=dt)  # noqa: E731
    return dict(u=r(batch, K, dim, L), delta=0.5 * r(batch, K, dim, L), A=-torch.exp(0.5 * r(K, dim, N, dt=torch.float32)),
                B=r(batch, K, N, L), C=r(batch, K, N, L), D=r(K, dim, dt=torch.float32), z=r(batch, K, dim, L),
                delta_bias=0.3 * r(K, dim, dt=torch.float32))


def permuted_loop(scan_fn, x, directions, H, W):
    ys = []
    for k, d in enumerate(directions):
        perm = lambda t: apply_scan(t[:, k], d, H, W, "BCL")  # noqa: E731
        y = scan_fn(perm(x["u"]), perm(x["delta"]), x["A"][k], perm(x["B"]), perm(x["C"]), x["D"][k], perm(x["z"]),
                    x["delta_bias"][k], True)
        ys.append(undo_scan(y, d, H, W, "BCL"))
    return torch.stack(ys, dim=1)


def cuda_variants(mamba_fn, config=None):
    from nas.ops.scan_triton import multi_direction_scan_triton

    def ours_single(u, delta, A, B, C, D, z, bias, sp):
        return selective_scan(u, delta, A, B, C, D, z, bias, sp, backend="triton")

    # in the order they are measured: the speed target's pair (a, c) first, so a run cut short still has it
    variants = {"a_fused_triton": lambda x, idx, dirs, H, W: multi_direction_scan_triton(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, idx, config)}
    if mamba_fn is not None:
        variants["c_mamba_x_permuted"] = lambda x, idx, dirs, H, W: permuted_loop(mamba_fn, x, dirs, H, W)
    variants["b_triton_x_permuted"] = lambda x, idx, dirs, H, W: permuted_loop(ours_single, x, dirs, H, W)
    variants["d_torch_backend"] = lambda x, idx, dirs, H, W: multi_direction_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, index=idx, backend="torch")
    return variants


def floor_ms(batch, K, dim, N, L, elt, mode, ceilings):
    X, Y = batch * K * dim * L * elt, batch * K * N * L * elt
    fwd_bytes, bwd_bytes = 4 * X + 2 * Y, 7 * X + 4 * Y  # fwd: u, delta, z, B, C in, y out; bwd adds dy, 5 grads
    exps = batch * K * dim * L * N
    nbytes = fwd_bytes + (bwd_bytes if mode == "fwdbwd" else 0)
    nexp = exps * (2 if mode == "fwdbwd" else 1)  # the backward recomputes the decays once
    t_bytes, t_exp = 1e3 * nbytes / ceilings["copy_bytes_per_s"], 1e3 * nexp / ceilings["exp2_per_s"]
    return {"bytes": nbytes, "exps": nexp, "bytes_ms": t_bytes, "exp_ms": t_exp, "floor_ms": max(t_bytes, t_exp)}


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def layer_cases(device, batch):
    """(case, batch, directions, d_inner, N) of the two layer shapes; tiny ones under the interpreter."""
    sizes = SIZES[device]
    return [("search", batch, SEARCH_DIRECTIONS, sizes["search"], sizes["N"]),
            ("derived", batch, DERIVED_DIRECTIONS, sizes["derived"], sizes["N"])]


def check_correctness(device, dtypes, record, batch=2):
    """Fused kernel vs the float64 sequential reference at the benchmark's layer shapes: ||a-r|| / ||r||."""
    from nas.ops.multi_scan import multi_direction_scan_torch

    tensor_dev = TENSOR_DEVICE[device]
    H, W = GRID[device]
    out = []
    for case, _, dirs, dim, N in layer_cases(device, batch):
        idx = scan_orders(dirs, H, W, tensor_dev)
        for dname in dtypes:
            x = {k: v.requires_grad_() for k, v in
                 layer_inputs(batch, len(dirs), dim, N, H * W, DTYPES[dname], tensor_dev, seed=1).items()}
            x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
            order = list(x)
            dy = torch.randn(batch, len(dirs), dim, H * W, device=tensor_dev, dtype=DTYPES[dname])
            y = multi_direction_scan(*(x[k] for k in order), True, index=idx, backend="triton")
            y_ref = multi_direction_scan_torch(*(x64[k] for k in order), True, index=idx, backend="ref")
            grads = torch.autograd.grad(y, [x[k] for k in order], dy)
            grads_ref = torch.autograd.grad(y_ref, [x64[k] for k in order], dy.double())
            errs = {"y": rel_err(y, y_ref), **{f"d{k}": rel_err(g, gr) for k, g, gr in zip(order, grads, grads_ref)}}
            out.append(record.add("correctness", {"case": case, "dtype": dname, "rel_err": errs}))
            print(f"correctness {case:8s} {dname:5s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return out


def run_gpu(args, record):
    """Each row goes into ``record`` as it is measured, with the ratios so far: the search shape in bf16,
    the speed target's case, comes first."""
    device = args.device
    tensor_dev = TENSOR_DEVICE[device]
    check_correctness(device, args.dtypes, record)
    ceilings = measure_ceilings(device)
    record.update(ceilings=ceilings)
    print(f"copy bandwidth {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, exp2 {ceilings['exp2_per_s'] / 1e12:.2f} T/s")
    mamba_fn = load_mamba(args.mamba_src)
    record.update(mamba_available=mamba_fn is not None)
    H, W = GRID[device]
    L = H * W
    cases = layer_cases(device, args.batch)
    configs = [None] + [tuple(int(v) for v in c.split("x")) for c in args.configs]
    warmup = 3 if device == "cuda" else 0  # nothing to warm up in the interpreter
    labels = [vname if config is None else f"{vname}[{'x'.join(map(str, config))}]"
              for config in configs for vname in cuda_variants(mamba_fn, config)
              if config is None or vname == "a_fused_triton"]
    record.update(plan=[f"{case} {dname} {label} {mode}" for case, *_ in cases for dname in args.dtypes
                        for label in labels for mode in ("fwd", "fwdbwd")])
    for case, batch, dirs, dim, N in cases:
        idx = scan_orders(dirs, H, W, tensor_dev)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x = layer_inputs(batch, len(dirs), dim, N, L, dtype, tensor_dev)
            dy = torch.randn(batch, len(dirs), dim, L, device=tensor_dev, dtype=dtype)
            for config in configs:
                for vname, fn in cuda_variants(mamba_fn, config).items():
                    if config is not None and vname != "a_fused_triton":
                        continue
                    label = vname if config is None else f"{vname}[{'x'.join(map(str, config))}]"
                    for mode in ("fwd", "fwdbwd"):
                        def step():
                            if mode == "fwd":
                                with torch.no_grad():
                                    fn(x, idx, dirs, H, W)
                            else:
                                xs = {k: v.detach().requires_grad_() for k, v in x.items()}
                                fn(xs, idx, dirs, H, W).backward(dy)
                        ms, peak = gpu_time_and_peak(step, device, warmup, args.reps)
                        fl = floor_ms(batch, len(dirs), dim, N, L, dtype.itemsize, mode, ceilings)
                        row = {"case": case, "batch": batch, "K": len(dirs), "d_inner": dim, "N": N, "L": L,
                               "dtype": dname, "variant": label, "mode": mode, "ms": ms, "peak_mib": peak, **fl,
                               "floor_fraction": fl["floor_ms"] / ms}
                        print(f"{case:8s} {dname:5s} {label:26s} {mode:7s} {ms:9.3f} ms  peak {peak:9.1f} MiB  "
                              f"floor {fl['floor_ms']:.3f} ms ({100 * fl['floor_ms'] / ms:5.1f}%)", flush=True)
                        record.add("rows", row, f"{case} {dname} {label} {mode}",
                                   ratios=gpu_ratios(record.data.get("rows", []) + [row]))
    print("\nratios (variant / a):")
    for entry in record.data.get("ratios", []):
        print("  " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))


def gpu_ratios(rows: list[dict]) -> list[dict]:
    """Per (case, dtype, mode) measured so far: each variant's time over the fused launch's."""
    out = []
    for case, dname, mode in dict.fromkeys((r["case"], r["dtype"], r["mode"]) for r in rows):
        pick = {r["variant"]: r["ms"] for r in rows if (r["case"], r["dtype"], r["mode"]) == (case, dname, mode)}
        if "a_fused_triton" in pick:
            a = pick["a_fused_triton"]
            out.append({"case": case, "dtype": dname, "mode": mode,
                        **{f"{v}_over_a": pick[v] / a for v in pick if v != "a_fused_triton"}})
    return out


def gpu_time_and_peak(step, device, warmup, reps):
    """(median ms, peak MiB above the memory in use before) of step(); NaNs when it runs out of GPU memory.
    The interpreter's peak is not tracked (NaN)."""
    if device != "cuda":
        return gpu_time_ms(step, device, warmup, reps), float("nan")
    try:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = gpu_time_ms(step, device, warmup, reps)
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda", "interpret"), default="cpu",
                   help="interpret: the CUDA benchmark's code at tiny sizes on CPU under TRITON_INTERPRET=1 "
                        "(checks this script; its numbers measure nothing)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128, help="CUDA: batch size of both shapes")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--configs", nargs="*", default=[], help="CUDA: extra fused launch configs BLOCK_DxT (channels per warp x steps per checkpoint)")
    p.add_argument("--mamba-src", default=None, help="CUDA: unpacked mamba_ssm source tree with its extension built")
    p.add_argument("--build-mamba-only", action="store_true", help="CUDA: only build mamba's extension, then exit")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_scan_<device>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(cpu_child(args.child, tuple(int(v) for v in args.shape.split(",")), args.mode, args.reps)))
        return
    if args.build_mamba_only:
        build_mamba_extension(args.mamba_src)
        return
    check_interpret_env(args.device)
    env = environment(args.device)
    tag = env["device_name"].replace(" ", "_") if args.device == "cuda" else args.device
    record = Record(args.out or ROOT / "benchmarks" / "results" / f"bench_scan_{tag}.json", "bench_scan", args.device,
                    env)
    if args.device == "cpu":
        run_cpu(args, record)
    else:
        run_gpu(args, record)
    record.finish()

if __name__ == "__main__":
    main()
