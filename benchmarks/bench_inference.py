"""Benchmark inference of derived models on CPU and the compiled training step (CPU or CUDA).

Inference: eager PyTorch (the compiled CPU kernels), torch.compile (Inductor) and onnxruntime (the file
nas.models.export_onnx writes), images/s at batch 1 and 32, fp32; and the form of the exported scan.

- part "models": local_vim_tiny and local_vssm_tiny (published directions) at 224. Per model: eager images/s,
  the compile time (first call) and compiled images/s, the export time, onnxruntime's logits against PyTorch's
  (max abs difference, batch 2) and its images/s. Every rate is the best of ``--reps`` timed calls after one
  warm-up call (compare by ratios); onnxruntime runs in a child process per batch size (``ort_child``: its peak
  memory is recorded, and a batch the machine's memory cannot hold is recorded as an error).
- part "forms": the exported scan alone (``nas.ops.scan_chunked``: the recurrence as an ONNX Scan, and the closed
  form over chunks of T steps for several T) at a LocalVim-T layer's shape (4 directions x 384 channels, 197
  tokens, N 16): export time, onnxruntime's time at batch 1 and 32, the largest error against the sequential
  reference. The exporter's form is chosen from this table.
- part "train": one training step (forward, cross-entropy, backward, AdamW) of the demo derived model and of the
  demo supernet at the demo's batch 64 and 28 x 28 images, eager and compiled (``torch.compile``, graph breaks
  allowed unless ``--fullgraph``): the first step (for the compiled model, its compile time) and the best steady
  step of each, and how many graphs and graph breaks Dynamo made (its counters, no extra tracing). One row per
  (model, eager or compiled), written as it is measured. ``--device cuda`` (the GPU suite): the same on the GPU
  under bf16 autocast, as the search trains there (scan backend "auto": Triton), each step timed to
  ``torch.cuda.synchronize``, with the peak memory. ``--device interpret``: the CUDA path's code on CPU at tiny
  sizes (depth 1, 16 x 16 images, batch 2, compiled with AOTAutograd alone: Inductor's C++ build takes minutes
  on a small CPU), a check of this script (gpu_check.sh --device interpret runs it); its numbers measure nothing.

Prints the tables and writes benchmarks/results/bench_inference_<device>.json (device, versions, rows).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# compile times are those of a first compile: Inductor's on-disk caches start empty unless the caller names a
# folder (set before torch loads, which sets the variable itself; the onnxruntime children inherit it)
FRESH_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if FRESH_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inference_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import Record, check_interpret_env, environment  # noqa: E402
from nas.engine.loop import autocast  # noqa: E402
from nas.models import create_model  # noqa: E402
from nas.models.export_onnx import export_onnx, onnx_logits  # noqa: E402
from nas.models.registry import model_spec  # noqa: E402
from nas.ops.scan_chunked import selective_scan_chunked, selective_scan_recurrent  # noqa: E402
from nas.ops.selective_scan import selective_scan_ref  # noqa: E402

MODELS = ["local_vim_tiny", "local_vssm_tiny"]
BATCHES = [1, 32]
FORMS = [None, 8, 16]  # None: the recurrence (ONNX Scan); T: chunks of T steps


def best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ort_session(path: str):
    import onnxruntime
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def ort_child(spec: dict) -> dict:
    """In a child process: onnxruntime's images/s on the file ``spec["path"]`` at ``spec["batch"]`` (best of
    ``spec["reps"]`` after a warm-up), and the process's peak memory. Its address space is capped at 80% of the
    memory available when it starts, so that a model too large for the machine ends in onnxruntime's allocation
    error (recorded) rather than the kernel's OOM killer, which may pick another process."""
    import numpy as np
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) * 1024
    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    cap = int(0.8 * available)
    resource.setrlimit(resource.RLIMIT_AS, (used + cap, resource.RLIM_INFINITY))
    out = {}
    try:
        session = ort_session(spec["path"])
        x = np.random.default_rng(0).standard_normal((spec["batch"], 3, 224, 224), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        out["img_s"] = spec["batch"] / best_seconds(lambda: session.run(None, feed), spec["reps"])
    except Exception as e:  # noqa: BLE001  (onnxruntime's errors are its own exception types)
        size = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", str(e))
        out["error"] = (f"out of memory: onnxruntime could not allocate {int(size[1]) / 2 ** 20:.0f} MiB more within "
                        f"{cap / 2 ** 30:.1f} GiB (80% of the memory available)" if size
                        else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def ort_rate(path: str, batch: int, reps: int) -> dict:
    """``ort_child`` in a fresh process: {img_s or error, peak_rss_mb}."""
    spec = json.dumps({"path": path, "batch": batch, "reps": reps})
    proc = subprocess.run([sys.executable, __file__, "--ort-child", spec], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"the onnxruntime process ended with exit status {proc.returncode} {tail[0][:300]}".strip()}


def bench_model(name: str, reps: int, folder: str, record: Record) -> dict:
    """One model's row; each figure is written to the record's ``partial`` as soon as it is measured."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    xs = {b: torch.randn(b, 3, 224, 224) for b in BATCHES}
    x2 = torch.randn(2, 3, 224, 224)
    row = {"model": name, "img_size": 224}

    def note(**fields):
        row.update(fields)
        record.update(partial=row)

    with torch.no_grad():
        for b, x in xs.items():
            note(**{f"eager_img_s_b{b}": b / best_seconds(lambda: model(x), reps)})
    path = os.path.join(folder, f"{name}.onnx")
    t0 = time.perf_counter()
    export_onnx(model, path, 224)
    note(export_s=time.perf_counter() - t0, onnx_mb=os.path.getsize(path) / 2 ** 20)
    with torch.no_grad():
        note(onnx_max_abs_diff=(onnx_logits(path, x2) - model(x2)).abs().max().item())
    for b in xs:
        r = ort_rate(path, b, reps)
        note(**{f"onnxruntime_img_s_b{b}": r.get("img_s"), f"onnxruntime_peak_mb_b{b}": r.get("peak_rss_mb")},
             **({f"onnxruntime_error_b{b}": r["error"]} if "error" in r else {}))
    with torch.no_grad():
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        compiled(xs[1])
        note(compile_s=time.perf_counter() - t0)
        for b, x in xs.items():
            note(**{f"compiled_img_s_b{b}": b / best_seconds(lambda: compiled(x), reps)})
        note(compiled_max_abs_diff=(compiled(x2) - model(x2)).abs().max().item())
    return row


class ScanModule(torch.nn.Module):
    def __init__(self, chunk: int | None):
        super().__init__()
        self.chunk = chunk

    def forward(self, u, delta, A, B, C, D, z, delta_bias):
        if self.chunk is None:
            return selective_scan_recurrent(u, delta, A, B, C, D, z, delta_bias, True)[0]
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, True, self.chunk)[0]


def scan_inputs(batch: int, K: int = 4, Di: int = 384, L: int = 197, N: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dim = K * Di
    return (torch.randn(batch, dim, L, generator=g), torch.randn(batch, dim, L, generator=g) - 1.0,
            -torch.exp(torch.rand(dim, N, generator=g) * 2.8), torch.randn(batch, K, N, L, generator=g),
            torch.randn(batch, K, N, L, generator=g), torch.randn(dim, generator=g),
            torch.randn(batch, dim, L, generator=g), torch.randn(dim, generator=g) * 0.5)


def bench_form(chunk: int | None, reps: int, folder: str) -> dict:
    path = os.path.join(folder, f"scan_{chunk}.onnx")
    example = scan_inputs(2)
    batch = torch.export.Dim("batch")
    dims = {"u": {0: batch}, "delta": {0: batch}, "A": None, "B": {0: batch}, "C": {0: batch}, "D": None,
            "z": {0: batch}, "delta_bias": None}
    t0 = time.perf_counter()
    program = torch.export.export(ScanModule(chunk), example, dynamic_shapes=dims)
    torch.onnx.export(program, example, dynamo=True).save(path)
    row = {"form": "recurrent (Scan)" if chunk is None else f"chunks of {chunk}", "export_s": time.perf_counter() - t0}
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    want = selective_scan_ref(*example[:5], *example[5:], True)
    got = torch.from_numpy(session.run(None, dict(zip(names, (t.numpy() for t in example))))[0])
    row["max_abs_diff_vs_ref"] = (got - want).abs().max().item()
    for b in BATCHES:
        feed = dict(zip(names, (t.numpy() for t in scan_inputs(b))))
        row[f"ms_b{b}"] = 1e3 * best_seconds(lambda: session.run(None, feed), reps)
    return row


# per device: the models (name, create_model overrides), image size, batch, autocast and compile backend
TRAIN = {
    "cpu": dict(models=[("local_vim_demo", {}), ("local_vim_demo_search", {})], img=28, batch=64, amp="none",
                backend="inductor"),
    "cuda": dict(models=[("local_vim_demo", {}), ("local_vim_demo_search", {})], img=28, batch=64, amp="bf16",
                 backend="inductor"),
    "interpret": dict(models=[("local_vim_demo", {"depth": 1, "embed_dim": 8,
                                                  "directions": model_spec("local_vim_demo").default_directions()[:1]}),
                              ("local_vim_demo_search", {"depth": 1, "embed_dim": 8})],
                      img=16, batch=2, amp="none", backend="aot_eager"),
}
TENSOR_DEVICE = {"cpu": "cpu", "cuda": "cuda", "interpret": "cpu"}


def train_row(name: str, overrides: dict, device: str, mode: str, reps: int, fullgraph: bool) -> dict:
    """One training step's times (forward + cross-entropy + backward + AdamW at random data) of ``name``, eager or
    compiled: the first step (the compile, for the compiled model) and the best of ``reps`` steady steps."""
    spec, dev = TRAIN[device], torch.device(TENSOR_DEVICE[device])
    torch.manual_seed(0)
    model = create_model(name, img_size=spec["img"], **overrides).to(dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["batch"], 3, spec["img"], spec["img"], generator=g).to(dev)
    y = torch.randint(0, model.num_classes, (spec["batch"],), generator=g).to(dev)
    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(model, backend=spec["backend"], fullgraph=fullgraph) if mode == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(spec["amp"], dev):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    step()
    row = {"model": name, "mode": mode, "batch": spec["batch"], "img_size": spec["img"], "amp": spec["amp"],
           "first_step_s": time.perf_counter() - t0, "step_s": best_seconds(step, reps)}
    if mode == "compiled":
        breaks = counters["graph_break"]
        row.update(compile_backend=spec["backend"], fullgraph=fullgraph, graphs=counters["stats"]["unique_graphs"],
                   graph_breaks=sum(breaks.values()), graph_break_reasons=[r.splitlines()[0] for r in list(breaks)[:3]])
    if dev.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return row


def bench_train(device: str, reps: int, fullgraph: bool, record: Record) -> None:
    spec = TRAIN[device]
    print(f"\ntraining step at batch {spec['batch']} ({spec['img']} x {spec['img']} images, amp {spec['amp']}), "
          f"seconds, {device}")
    steps = {}
    for name, overrides in spec["models"]:
        for mode in ("eager", "compiled"):
            r = record.add("train", train_row(name, overrides, device, mode, reps, fullgraph), f"train {name} {mode}")
            steps[name, mode] = r["step_s"]
            print(f"{name} {mode}: first step {r['first_step_s']:.3g}, steady step {r['step_s']:.3g}"
                  + (f", {r['graphs']} graphs, {r['graph_breaks']} graph breaks" if mode == "compiled" else ""),
                  flush=True)
        record.update(eager_over_compiled_step={n: steps[n, "eager"] / steps[n, "compiled"] for n, _ in spec["models"]
                                                if (n, "compiled") in steps})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=None, help="comma-separated: forms, models, train (default: all three on cpu, "
                   "train elsewhere)")
    p.add_argument("--device", choices=tuple(TRAIN), default="cpu",
                   help="the train part's device (forms and models run on cpu); interpret: the CUDA path's code at "
                        "tiny sizes on CPU under TRITON_INTERPRET=1 (checks this script; its numbers measure nothing)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fullgraph", action="store_true", help="train: compile with fullgraph=True (fail at a graph break)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_inference_<device>.json)")
    p.add_argument("--ort-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ort_child:
        print(json.dumps(ort_child(json.loads(args.ort_child))))
        return
    parts = (args.parts or ("forms,models,train" if args.device == "cpu" else "train")).split(",")
    if args.device != "cpu" and parts != ["train"]:
        p.error(f"--parts: only train runs with --device {args.device} (forms and models run on cpu)")
    check_interpret_env(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_inference_{args.device}.json"
    record = Record(out, "bench_inference", args.device, environment(TENSOR_DEVICE[args.device]), reps=args.reps,
                    inductor_cache="empty at the start" if FRESH_CACHE else os.environ["TORCHINDUCTOR_CACHE_DIR"])
    forms = [f"form {c}" for c in FORMS]
    record.update(plan=(forms if "forms" in parts else []) + [m for m in MODELS if "models" in parts]
                  + [f"train {m} {mode}" for m, _ in TRAIN[args.device]["models"] for mode in ("eager", "compiled")
                     if "train" in parts])
    with tempfile.TemporaryDirectory() as folder:
        if "forms" in parts:
            print("exported scan, LocalVim-T layer shape (4 x 384 channels, L 197, N 16), onnxruntime")
            print(f"{'form':>18} {'b1 ms':>9} {'b32 ms':>9} {'max err':>9} {'export s':>9}")
            for c, label in zip(FORMS, forms):
                r = record.add("forms", bench_form(c, args.reps, folder), label)
                print(f"{r['form']:>18} {r['ms_b1']:>9.1f} {r['ms_b32']:>9.1f} {r['max_abs_diff_vs_ref']:>9.1e} "
                      f"{r['export_s']:>9.1f}", flush=True)
        if "models" in parts:
            print("\nimages/s at 224, fp32 (eager: the compiled CPU kernels; compiled: torch.compile; ort: onnxruntime)")
            for name in MODELS:
                r = record.add("models", bench_model(name, args.reps, folder, record), name, partial=None)
                print(f"{name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items() if k not in ("model", "img_size")), flush=True)
    if "train" in parts:
        bench_train(args.device, args.reps, args.fullgraph, record)
    record.finish()


if __name__ == "__main__":
    main()
