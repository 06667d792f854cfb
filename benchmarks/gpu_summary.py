"""The summary table of benchmarks/gpu_check.sh: each part's status and time, and the numbers the GPU targets
are about, from the parts' JSON records. Also writes the records of the two parts that are not benchmark
scripts (the Triton tests' counts, the search run's epoch line) and gpu_check_<tag>.json with it all.
Exit status 1 when a record a finished part should have written is missing or unreadable."""
from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

PARTS = ("triton_tests", "bench_supernet", "bench_search", "search_run", "train_compile", "bench_scan")
# the record each benchmark part writes: <file>_<tag>.json
RECORDS = {"bench_supernet": "bench_supernet", "bench_search": "bench_search", "train_compile": "bench_inference_train",
           "bench_scan": "bench_scan"}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(junit: Path):
    """{tests, failures, errors, skipped} of a pytest --junitxml file, None if it cannot be read."""
    try:
        suite = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def search_run(folder: Path):
    """The search run's last epoch line from its log.jsonl, None without one."""
    try:
        lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    epochs = [r for r in lines if "epoch" in r and "event" not in r]
    return {"epoch": epochs[-1] if epochs else None}


def scan_lines(rec) -> list[str]:
    out = []
    for r in rec.get("ratios", []):
        if r["mode"] != "fwdbwd":
            continue
        mamba = r.get("c_mamba_x_permuted_over_a")
        out.append(f"{r['case']} {r['dtype']}: 8 launches/fused {r.get('b_triton_x_permuted_over_a', float('nan')):.2f}x, "
                   f"torch/fused {r.get('d_torch_backend_over_a', float('nan')):.2f}x, "
                   + (f"mamba_ssm x K/fused {mamba:.2f}x (target >= 1.5)" if mamba else "mamba_ssm: not built"))
    for r in rec.get("rows", []):
        if r["variant"] == "a_fused_triton" and r["mode"] == "fwdbwd":
            out.append(f"{r['case']} {r['dtype']}: fused {r['ms']:.3f} ms, floor {r['floor_ms']:.3f} ms "
                       f"({r['ms'] / r['floor_ms']:.2f}x the floor; target <= 2)")
    errs = [max(c["rel_err"].values()) for c in rec.get("correctness", [])]
    if errs:
        out.append(f"float64 check: worst relative error {max(errs):.1e} over {len(errs)} (shape, dtype) cases")
    return out


def train_lines(rec) -> list[str]:
    """bench_inference.py's train rows: eager and compiled step, compile time, graph breaks."""
    out = []
    for r in rec.get("train", []):
        line = f"{r['model']} {r['mode']}: {1e3 * r['step_s']:.1f} ms/step, first step {r['first_step_s']:.1f} s"
        if r["mode"] == "compiled":
            line += f", {r['graphs']} graphs, {r['graph_breaks']} graph breaks"
        out.append(line + (f", peak {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""))
    out += [f"{name}: eager/compiled step {ratio:.2f}x" for name, ratio in rec.get("eager_over_compiled_step", {}).items()]
    return out


def partial_line(rec) -> str:
    """What a record left by a benchmark stopped before its end holds, and what it lacks."""
    plan, done = rec.get("plan", []), rec.get("done", [])
    missing = [p for p in plan if p not in done]
    shown = "; ".join(missing[:4]) + (f"; and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (f"PARTIAL: stopped before its end, {len(done)} of {len(plan)} rows measured"
            + (f"; missing: {shown}" if missing else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--status", required=True, help="lines 'part exit-code seconds' written by gpu_check.sh")
    p.add_argument("--junit", required=True)
    p.add_argument("--run", required=True, help="the search run's folder")
    args = p.parse_args()
    results, tag = Path(args.results), args.tag
    status = {}
    for line in Path(args.status).read_text().splitlines():
        name, rc, seconds = line.split()
        status[name] = {"exit": int(rc), "seconds": int(seconds)}
    tests = test_counts(Path(args.junit))
    (results / f"gpu_triton_tests_{tag}.json").write_text(json.dumps({"tag": tag, "counts": tests}, indent=1))
    run = search_run(Path(args.run))
    (results / f"gpu_search_run_{tag}.json").write_text(json.dumps({"tag": tag, "run": run}, indent=1))
    records = {name: read_json(results / f"{file}_{tag}.json") for name, file in RECORDS.items()}

    lines = {"triton_tests": [] if tests is None else [
        f"{tests['tests']} tests, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped"]}
    sup = records["bench_supernet"]
    lines["bench_supernet"] = [] if sup is None else [
        f"{r['label']} {r['path']} batch {r['batch']}: " + (f"{r['ms_median']:.1f} ms/step, peak {r['peak_mib']:.0f} MiB"
                                                            if "error" not in r else f"failed: {r['error']}")
        for r in sup["rows"]] + [f"{e['label']}: loop/batched {e['loop_over_batched']:.2f}x" for e in sup["ratios"]
                                 if "loop_over_batched" in e]
    srch = records["bench_search"]
    lines["bench_search"] = [] if srch is None else [
        f"{r['strategy']} k={r['k']}: failed: {r['error']}" if "error" in r else
        f"{r['strategy']} k={r['k']} batch {r['batch']}: {r['images_per_s']:.1f} img/s, peak {r['peak_mib']:.0f} MiB"
        for r in srch["rows"]] + ([f"sampled/joint peak memory {srch['sampled_over_joint_peak_memory']:.2f}x"]
                                  if "sampled_over_joint_peak_memory" in srch else [])
    epoch = (run or {}).get("epoch")
    lines["search_run"] = [] if not epoch else [
        f"epoch 1: train_loss {epoch['train_loss']:.3f}, {epoch['images_per_s']:.1f} img/s, "
        f"peak {epoch.get('peak_memory_mb', float('nan')):.0f} MB, {epoch.get('epoch_time_s', float('nan')):.1f} s"]
    lines["train_compile"] = [] if records["train_compile"] is None else train_lines(records["train_compile"])
    lines["bench_scan"] = [] if records["bench_scan"] is None else scan_lines(records["bench_scan"])
    for name, rec in records.items():
        if rec is not None and not rec.get("complete"):
            lines[name].append(partial_line(rec))

    missing = [name for name in PARTS if status.get(name, {}).get("exit") == 0 and not lines[name]]
    print(f"\nGPU suite ({tag}) {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(f"{'part':16s} {'status':>8s} {'s':>5s}  numbers")
    for name in PARTS:
        st = status.get(name)
        state = ("not run" if st is None else "ok" if st["exit"] == 0 else
                 "time out" if st["exit"] in (124, 137) else f"exit {st['exit']}")
        body = lines[name] or ["(no record)"]
        print(f"{name:16s} {state:>8s} {st['seconds'] if st else '':>5}  {body[0]}")
        for extra in body[1:]:
            print(f"{'':32s}{extra}")
    (results / f"gpu_check_{tag}.json").write_text(json.dumps(
        {"tag": tag, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "status": status, "summary": lines}, indent=1))
    if missing:
        print(f"gpu_summary.py: no readable record from {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
