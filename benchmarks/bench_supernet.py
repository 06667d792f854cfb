"""Benchmark one search training step of the supernets: our batched scan against the per-direction loop, our
PyTorch scan and mambapy's parallel scan, and all against the arithmetic floor of the scan.

One step = forward + cross-entropy + backward + AdamW (alpha in its own group without weight decay), on
random images and labels. Every (model, path) runs in its own subprocess, so that its peak memory can be
read (CPU: ru_maxrss minus the RSS before the first step; CUDA: max_memory_allocated).
- path "batched": every layer runs all its directions in one multi_direction_scan call (the default), scan
  backend "auto" (CPU: the compiled kernel, ``nas.ops.scan_cpu``);
- path "loop": one selective_scan per direction on permuted copies (LocalMamba's structure), same backend;
- path "torch" (CPU): the batched model on the PyTorch scan (``nas.ops.scan_torch``), the CPU scan before the
  compiled kernel and what runs where no C compiler is;
- path "mambapy" (CPU): the batched model with its selective scans computed the way mambapy's Mamba does
  (``bench_common.mambapy_selective_scan``: mambapy's parallel scan), the pure-PyTorch scan a CPU user
  would otherwise take.

CPU (default): the demo supernets (the demo's batch 64) and scaled-down real supernets (real widths, fewer
layers) at batch 8, fp32. For each step the script also records the selective scans
it ran, times them alone (forward + backward, same shapes, random inputs, same path), counts their
exponentials and multiply-adds (``bench_common.SCAN_FMAS``) and measures this machine's exp2 and FMA
throughput in PyTorch at the same thread count: the floor is exps / exp2 rate + FMAs / FMA rate, and the
table gives the step and its scans as multiples of it. A second table times the scan alone at layer shapes
(the demo layer, LocalVim-T search and derived layers, the LocalVMamba search stages): the compiled kernel
against our PyTorch scan and mambapy's on the same inputs, with the floor. The floor is what PyTorch's own
exp2 and multiply-add run at; the compiled kernel, which does a step in registers, can go below it.
CUDA (--device cuda): the real supernets at batch 128 under bf16 autocast, scan backend "auto" (Triton).
--device interpret: the CUDA path's code on CPU under TRITON_INTERPRET=1 (scan backend "auto": torch) at tiny
sizes, a check of this script (tests run it); its numbers measure nothing.

Prints the tables and writes a JSON record (device, versions, results) to
benchmarks/results/bench_supernet_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import (Record, check_interpret_env, current_rss_kb, cpu_throughput, environment,  # noqa: E402
                          mambapy_selective_scan, scan_floor_ms)
import nas.ops.scan_cpu as scan_cpu  # noqa: E402
from nas.ops import cpu_kernels  # noqa: E402
import nas.ops.scan_torch as scan_torch  # noqa: E402
from nas.models import count_parameters, create_model, set_batched, split_parameters  # noqa: E402
from nas.ops import scan_tables  # noqa: E402
from nas.ops import DIRECTIONS, multi_direction_scan  # noqa: E402

# (label, model name, create_model overrides, image size, batch sizes)
MODELS = {
    "cpu": [
        ("vim_demo", "local_vim_demo_search", {}, 28, [64, 8]),
        ("vssm_demo", "local_vssm_demo_search", {}, 28, [64]),
        ("vim_tiny_search_d2", "local_vim_tiny_search", {"depth": 2}, 224, [8]),
        ("vssm_tiny_search_1121@112", "local_vssm_tiny_search", {"depths": [1, 1, 2, 1], "img_size": 112}, 112, [8]),
    ],
    "cuda": [
        ("vim_tiny_search", "local_vim_tiny_search", {}, 224, [128]),
        ("vssm_tiny_search", "local_vssm_tiny_search", {}, 224, [128]),
        ("vssm_small_search", "local_vssm_small_search", {}, 224, [128]),
    ],
    "interpret": [
        ("vim_demo_d1", "local_vim_demo_search", {"depth": 1, "embed_dim": 8}, 16, [1]),
    ],
}
PATHS = {"cpu": ("batched", "loop", "torch", "mambapy"), "cuda": ("batched", "loop"), "interpret": ("batched", "loop")}
TENSOR_DEVICE = {"cpu": "cpu", "cuda": "cuda", "interpret": "cpu"}
# the scan backend of each path; interpret: "torch" on CPU tensors (the Triton interpreter would take minutes
# per step; bench_scan --device interpret runs the kernels)
BACKEND = {"batched": "auto", "loop": "auto", "torch": "torch", "mambapy": "torch"}
INTERPRET_BACKEND = "torch"

# (label, batch, K, d_inner, N, grid, class token) of the scan-alone table (CPU)
LAYERS = [
    ("demo layer", 64, 8, 96, 16, (7, 7), False),
    ("LocalVim-T search layer", 8, 8, 256, 16, (14, 14), True),
    ("LocalVim-T derived layer", 8, 4, 384, 16, (14, 14), True),
    ("LocalVMamba-T search stage 1", 2, 8, 64, 16, (56, 56), False),
    ("LocalVMamba-T search stage 2", 2, 8, 128, 16, (28, 28), False),
    ("LocalVMamba-T search stage 3", 2, 8, 256, 16, (14, 14), False),
    ("LocalVMamba-T search stage 4", 2, 8, 512, 16, (7, 7), False),
]


def scan_inputs(u_shape, bc_shape, opts, seed=0):
    """Random inputs of one selective_scan call in realistic ranges (A < 0, raw delta around -1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    batch, dim, L = u_shape
    N = bc_shape[-2]
    x = {"u": r(*u_shape), "delta": 0.5 * r(*u_shape) - 1.0, "A": -torch.exp(0.5 * r(dim, N)), "B": r(*bc_shape),
         "C": r(*bc_shape), "D": r(dim) if "D" in opts else None, "z": r(*u_shape) if "z" in opts else None,
         "delta_bias": 0.3 * r(dim) if "delta_bias" in opts else None}
    return x


def time_fwdbwd(fn, reps: int, warmup: int = 1) -> float:
    """Median ms of fn() (which runs a forward and a backward)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


class ScanRecorder:
    """Wraps a backend's selective scan: remembers the shapes and options of every call."""

    def __init__(self, fn):
        self.fn, self.calls, self.on = fn, [], True

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
        if self.on:
            opts = tuple(k for k, v in (("D", D), ("z", z), ("delta_bias", delta_bias)) if v is not None)
            self.calls.append((tuple(u.shape), tuple(B.shape), opts, bool(delta_softplus)))
        return self.fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def time_alone(self, reps: int) -> tuple[float, int]:
        """(ms of forward + backward of every recorded call, run alone; their state values x steps)."""
        total, state_steps = 0.0, 0
        for i, (u_shape, bc_shape, opts, softplus) in enumerate(self.calls):
            x = {k: None if v is None else v.requires_grad_() for k, v in scan_inputs(u_shape, bc_shape, opts, i).items()}
            dy = torch.randn(u_shape)

            def run():
                self.fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                        softplus).backward(dy)
            total += time_fwdbwd(run, reps)
            state_steps += u_shape[0] * u_shape[1] * u_shape[2] * bc_shape[-2]
        return total, state_steps


def child(spec: dict) -> dict:
    """Runs in a fresh process: `steps` timed training steps after `warmup` ones."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(TENSOR_DEVICE[spec["device"]])
    # the recorder stands in for the backend's scan function (selective_scan looks it up at each call); the
    # mambapy path swaps mambapy's scan in under the torch backend
    backend = INTERPRET_BACKEND if spec["device"] == "interpret" else BACKEND[spec["path"]]
    module = scan_cpu if backend == "auto" and device.type == "cpu" and cpu_kernels.available() else scan_torch
    name = "selective_scan_cpu" if module is scan_cpu else "selective_scan_torch"
    recorder = ScanRecorder(mambapy_selective_scan if spec["path"] == "mambapy" else getattr(module, name))
    setattr(module, name, recorder)
    torch.manual_seed(0)
    model = create_model(spec["model"], backend=backend, **spec["overrides"]).to(device)
    set_batched(model, spec["path"] != "loop")
    weights, alphas = split_parameters(model)
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.05}, {"params": alphas, "weight_decay": 0.0}],
                            lr=1e-4)
    size = spec["img_size"]
    images = torch.randn(spec["batch"], 3, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (spec["batch"],), device=device)
    use_amp = spec["device"] == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_kb = current_rss_kb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    recorder.on = False
    for _ in range(spec["warmup"] - 1):
        step()
    sync()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024
    med = statistics.median(times)
    out = {"ms_median": 1e3 * med, "ms_min": 1e3 * min(times), "images_per_s": spec["batch"] / med,
           "peak_mib": peak_mib, "params": count_parameters(model), "loss_finite": bool(torch.isfinite(loss)),
           "threads": torch.get_num_threads(), "scan_function": recorder.fn.__name__}
    if spec["device"] == "cpu":
        out["scan_ms"], out["scan_state_steps"] = recorder.time_alone(max(1, spec["steps"] // 2))
        out["scan_calls"] = len(recorder.calls)
    return out


def run_steps(args, rates, record) -> list[dict]:
    """Every (model, batch, path) in its own subprocess; each row (and the ratios so far) goes into ``record``
    as it is measured."""
    models = MODELS[args.device]
    if args.only:
        models = [m for m in models if m[0] in args.only]
    floors = rates is not None
    record.update(plan=[f"{label} {path} batch {batch}" for label, _, _, _, batches in models
                        for batch in args.batch or batches for path in PATHS[args.device]])
    print(f"{'model':28s} {'path':8s} {'batch':>5s} {'ms/step':>9s} {'min':>8s} {'img/s':>7s} {'peak MiB':>9s}"
          + (f" {'scan ms':>8s} {'floor ms':>8s} {'step/floor':>10s} {'scan/floor':>10s}" if floors else ""))
    for label, name, overrides, size, batches in models:
        for batch in args.batch or batches:
            for path in PATHS[args.device]:
                spec = {"device": args.device, "model": name, "overrides": overrides, "img_size": size, "path": path,
                        "batch": batch, "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True)
                row = {"label": label, "model": name, "overrides": overrides, "img_size": size, "path": path,
                       "batch": batch, "dtype": "bf16-autocast" if args.device == "cuda" else "fp32"}
                if out.returncode != 0:
                    row["error"] = (out.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{label:28s} {path:8s} {batch:5d} failed: {row['error']}", flush=True)
                    record.add("rows", row, f"{label} {path} batch {batch}")
                    continue
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                line = (f"{label:28s} {path:8s} {batch:5d} {row['ms_median']:9.1f} {row['ms_min']:8.1f} "
                        f"{row['images_per_s']:7.1f} {row['peak_mib']:9.1f}")
                if floors:
                    row.update(scan_floor_ms(row["scan_state_steps"], "fwdbwd", rates))
                    row["step_over_floor"] = row["ms_median"] / row["floor_ms"]
                    row["scan_over_floor"] = row["scan_ms"] / row["floor_ms"]
                    line += (f" {row['scan_ms']:8.1f} {row['floor_ms']:8.1f} {row['step_over_floor']:10.2f} "
                             f"{row['scan_over_floor']:10.2f}")
                print(line, flush=True)
                record.add("rows", row, f"{label} {path} batch {batch}", ratios=ratios(record.data["rows"] + [row]))
    return record.data["rows"]


def ratios(rows: list[dict]) -> list[dict]:
    """Per (model, batch): every other path's median step over the batched one's, and peak memory."""
    out = []
    for label, batch in dict.fromkeys((r["label"], r["batch"]) for r in rows):
        pick = {r["path"]: r for r in rows if (r["label"], r["batch"]) == (label, batch) and "error" not in r}
        if "batched" not in pick:
            continue
        ref = pick["batched"]
        entry = {"label": label, "batch": batch}
        for path, r in pick.items():
            if path != "batched":
                entry[f"{path}_over_batched"] = r["ms_median"] / ref["ms_median"]
                entry[f"peak_mem_batched_over_{path}"] = ref["peak_mib"] / max(r["peak_mib"], 1e-9)
        out.append(entry)
    return out


def print_ratios(out: list[dict]) -> None:
    print("\nper-step time of each path over the batched scan's (higher = batched faster), peak memory batched/path:")
    for e in out:
        print(f"  {e['label']:28s} batch {e['batch']:4d} " + "  ".join(
            f"{p}: {e[f'{p}_over_batched']:5.2f}x (mem {e[f'peak_mem_batched_over_{p}']:.2f})"
            for p in PATHS["cpu"] if f"{p}_over_batched" in e))


def run_layers(args, rates, record) -> list[dict]:
    """The scan alone at layer shapes, fwd + bwd, same inputs: the compiled kernel (when it builds here), our
    PyTorch scan and mambapy's, each through multi_direction_scan."""
    fns = {"torch": scan_torch.selective_scan_torch, "mambapy": mambapy_selective_scan}
    if cpu_kernels.available():
        fns = {"cpu": scan_cpu.selective_scan_cpu, **fns}
    ours = next(iter(fns))
    print(f"\n{'layer (scan alone, fwd+bwd)':30s} " + " ".join(f"{k + ' ms':>10s}" for k in fns)
          + f" {'mambapy/' + ours:>13s} {'torch/' + ours:>11s} {'floor ms':>9s} {ours + '/floor':>10s}")
    rows = []
    for label, batch, K, dim, N, (H, W), cls in LAYERS:
        table, _ = scan_tables(tuple(DIRECTIONS[:K]), H, W, torch.device("cpu"), (H * W) // 2 if cls else None)
        L = H * W + cls
        S = table.shape[1]
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        x = [r(batch, K, dim, L), 0.5 * r(batch, K, dim, L) - 1.0, -torch.exp(0.5 * r(K, dim, N)), r(batch, K, N, L),
             r(batch, K, N, L), r(K, dim), r(batch, K, dim, L), 0.3 * r(K, dim)]
        x = [v.requires_grad_() for v in x]
        dy = torch.randn(batch, K, dim, L)
        row = {"layer": label, "batch": batch, "K": K, "d_inner": dim, "N": N, "L": L, "scan_len": S, "ours": ours}
        for name, fn in fns.items():
            # the torch backend's function swapped for mambapy's; the others through their own backend
            scan_torch.selective_scan_torch = fn if name == "mambapy" else fns["torch"]
            backend = "cpu" if name == "cpu" else "torch"

            def run():
                multi_direction_scan(*x[:5], x[5], x[6], x[7], True, index=table, backend=backend).backward(dy)
            row[f"{name}_ms"] = time_fwdbwd(run, args.layer_reps)
        scan_torch.selective_scan_torch = fns["torch"]
        row.update(scan_floor_ms(batch * K * dim * N * S, "fwdbwd", rates))
        row["mambapy_over_ours"] = row["mambapy_ms"] / row[f"{ours}_ms"]
        row["torch_over_ours"] = row["torch_ms"] / row[f"{ours}_ms"]
        row["ours_over_floor"] = row[f"{ours}_ms"] / row["floor_ms"]
        print(f"{label:30s} " + " ".join(f"{row[k + '_ms']:10.1f}" for k in fns)
              + f" {row['mambapy_over_ours']:12.1f}x {row['torch_over_ours']:10.1f}x {row['floor_ms']:9.1f} "
              f"{row['ours_over_floor']:10.2f}", flush=True)
        record.add("layers", row)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=tuple(MODELS), default="cpu",
                   help="interpret: the CUDA path's code at tiny sizes on CPU under TRITON_INTERPRET=1 (checks this "
                        "script; its numbers measure nothing)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: each model's own)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per (model, path)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--layer-reps", type=int, default=3, help="CPU: timed calls per layer shape of the scan-alone table")
    p.add_argument("--no-layers", action="store_true", help="CPU: skip the scan-alone table")
    p.add_argument("--only", nargs="*", help="labels of the models to run (default: all of the device's list)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_supernet_<device>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    check_interpret_env(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(TENSOR_DEVICE[args.device] if args.device != "interpret" else "cpu")
    if args.device == "cpu":
        env["cpu_kernel"] = cpu_kernels.problem() or "built"
    rates = None
    if args.device == "cpu":
        rates = cpu_throughput()
        print(f"this machine, {torch.get_num_threads()} threads: exp2 {rates['exp2_per_s'] / 1e9:.2f} G/s, "
              f"fused multiply-add {rates['fma_per_s'] / 1e9:.2f} G/s\n")
    record = Record(args.out or ROOT / "benchmarks" / "results" / f"bench_supernet_{args.device}.json",
                    "bench_supernet", args.device, env, steps=args.steps, rates=rates, rows=[], ratios=[], layers=[])
    print_ratios(ratios(run_steps(args, rates, record)))
    if args.device == "cpu" and not args.no_layers:
        run_layers(args, rates, record)
    record.finish()

if __name__ == "__main__":
    main()
