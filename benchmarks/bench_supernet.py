"""Benchmark one search training step of the supernets: the batched scan against the per-direction loop.

One step = forward + cross-entropy + backward + AdamW (alpha in its own group without weight decay), on
random images and labels. Every (model, path) runs in its own subprocess, so that its peak memory can be
read (CPU: ru_maxrss minus the RSS before the first step; CUDA: max_memory_allocated).
- path "batched": every layer runs all its directions in one multi_direction_scan call (the default);
- path "loop": one selective_scan per direction on permuted copies (LocalMamba's structure).

CPU (default): the demo supernets and scaled-down real supernets (real widths, fewer layers) at small
batches (2 and 8), fp32, scan backend "torch". CUDA (--device cuda): the real supernets at batch 128 under
bf16 autocast, scan backend "auto" (Triton).

On CPU the batched call wins by running one op where the loop runs K: it pays off most at small batches,
where per-op overhead dominates. Its cost: every direction runs to the length of the layer's longest
scan (window scans pad the grid; pads past a scan's last token are trimmed), so at large batches, where
the torch backend is bound by the elements it touches, the two paths converge.

Prints a table and writes a JSON record (device, versions, results) to
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

from bench_common import current_rss_kb, environment  # noqa: E402
from nas.models import count_parameters, create_model, set_batched, split_parameters  # noqa: E402

# (label, model name, create_model overrides, image size)
CPU_MODELS = [
    ("vim_demo", "local_vim_demo_search", {}, 28),
    ("vssm_demo", "local_vssm_demo_search", {}, 28),
    ("vim_tiny_search_d2", "local_vim_tiny_search", {"depth": 2}, 224),
    ("vssm_tiny_search_1121@112", "local_vssm_tiny_search", {"depths": [1, 1, 2, 1], "img_size": 112}, 112),
]
CUDA_MODELS = [
    ("vim_tiny_search", "local_vim_tiny_search", {}, 224),
    ("vssm_tiny_search", "local_vssm_tiny_search", {}, 224),
    ("vssm_small_search", "local_vssm_small_search", {}, 224),
]
PATHS = ("batched", "loop")



def child(spec: dict) -> dict:
    """Runs in a fresh process: `steps` timed training steps after `warmup` ones."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = create_model(spec["model"], backend=spec["backend"], **spec["overrides"]).to(device)
    set_batched(model, spec["path"] == "batched")
    weights, alphas = split_parameters(model)
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.05}, {"params": alphas, "weight_decay": 0.0}],
                            lr=1e-4)
    size = spec["img_size"]
    images = torch.randn(spec["batch"], 3, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (spec["batch"],), device=device)
    use_amp = spec["amp"] and device.type == "cuda"

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
    return {"ms_median": 1e3 * med, "ms_min": 1e3 * min(times), "images_per_s": spec["batch"] / med,
            "peak_mib": peak_mib, "params": count_parameters(model), "loss_finite": bool(torch.isfinite(loss))}


def run(args) -> list[dict]:
    models = CUDA_MODELS if args.device == "cuda" else CPU_MODELS
    if args.only:
        models = [m for m in models if m[0] in args.only]
    rows = []
    print(f"{'model':28s} {'path':8s} {'batch':>5s} {'ms/step (median)':>17s} {'min':>9s} {'img/s':>8s} {'peak MiB':>9s}")
    for label, name, overrides, size in models:
        for batch in args.batch:
            for path in PATHS:
                spec = {"device": args.device, "model": name, "overrides": overrides, "img_size": size, "path": path,
                        "batch": batch, "steps": args.steps, "warmup": args.warmup, "amp": args.device == "cuda",
                        "backend": "torch" if args.device == "cpu" else "auto"}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True)
                if out.returncode != 0:
                    res = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
                    print(f"{label:28s} {path:8s} {batch:5d} failed: {res['error']}", flush=True)
                else:
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"{label:28s} {path:8s} {batch:5d} {res['ms_median']:17.1f} {res['ms_min']:9.1f} "
                          f"{res['images_per_s']:8.1f} {res['peak_mib']:9.1f}", flush=True)
                rows.append({"label": label, "model": name, "overrides": overrides, "img_size": size, "path": path,
                             "batch": batch, "dtype": "bf16-autocast" if spec["amp"] else "fp32", **res})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for label, batch in dict.fromkeys((r["label"], r["batch"]) for r in rows):
        pick = {r["path"]: r for r in rows if (r["label"], r["batch"]) == (label, batch) and "error" not in r}
        if set(pick) != set(PATHS):
            continue
        out.append({"label": label, "batch": batch,
                    "loop_over_batched_median": pick["loop"]["ms_median"] / pick["batched"]["ms_median"],
                    "loop_over_batched_min": pick["loop"]["ms_min"] / pick["batched"]["ms_min"],
                    "peak_mem_batched_over_loop": pick["batched"]["peak_mib"] / max(pick["loop"]["peak_mib"], 1e-9)})
    print("\nper-step speedup of the batched scan over the per-direction loop (median / best step), memory ratio:")
    for r in out:
        print(f"  {r['label']:28s} batch {r['batch']:4d} {r['loop_over_batched_median']:5.2f}x / "
              f"{r['loop_over_batched_min']:5.2f}x   "
              f"peak memory batched/loop {r['peak_mem_batched_over_loop']:.2f}")
    return out



def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 2 8 on CPU, 128 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per (model, path)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", help="labels of the models to run (default: all of the device's list)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_supernet_<device>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.batch is None:
        args.batch = [128] if args.device == "cuda" else [2, 8]
    env = environment(args.device)
    rows = run(args)
    summary = ratios(rows)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_supernet_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_supernet", "device": args.device, "environment": env,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps, "rows": rows,
                               "ratios": summary}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
