"""benchmarks/gpu_check.sh, the GPU suite, run end to end on CPU under the Triton interpreter at tiny sizes
(--device interpret): every part runs and writes its record, and the summary reads them all. Its timings
mean nothing; this guards the one command a GPU session runs."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["triton_tests", "bench_supernet", "bench_search", "search_run", "train_compile", "bench_scan"]


@pytest.mark.interpret
def test_suite_runs_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPU_CHECK_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "interpret"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "gpu_check_interpret.json").read_text())
    assert list(summary["status"]) == PARTS and all(s["exit"] == 0 for s in summary["status"].values())
    assert all(summary["summary"][p] for p in PARTS)  # every part's numbers were read from its record
    for name in ("bench_supernet", "bench_search", "bench_scan", "bench_inference_train"):
        assert json.loads((tmp_path / f"{name}_interpret.json").read_text())["device"] == "interpret"
    train = json.loads((tmp_path / "bench_inference_train_interpret.json").read_text())
    assert train["complete"] and [(r["model"], r["mode"]) for r in train["train"]] == [
        (m, mode) for m in ("local_vim_demo", "local_vim_demo_search") for mode in ("eager", "compiled")]
    assert all(r["step_s"] > 0 and r["graphs"] >= 1 for r in train["train"] if r["mode"] == "compiled")
    counts = json.loads((tmp_path / "gpu_triton_tests_interpret.json").read_text())["counts"]
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0
    epoch = json.loads((tmp_path / "gpu_search_run_interpret.json").read_text())["run"]["epoch"]
    assert epoch["epoch"] == 1 and epoch["train_loss"] > 0
    table = proc.stdout[proc.stdout.index("GPU suite (interpret)"):]
    assert all(f"\n{p}" in table for p in PARTS)


def test_bad_device_is_a_one_line_error(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "tpu"], env={**os.environ, "GPU_CHECK_OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check.sh: --device: expected cuda or interpret, got tpu"
    assert not any(tmp_path.iterdir())


def test_wrong_number_of_limits_is_a_one_line_error(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_LIMITS": "100 80 70 80 150"}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "interpret"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpu_check.sh: GPU_CHECK_LIMITS: expected 6 time limits in seconds (one per part), "
                                   "got '100 80 70 80 150'")
    assert "== triton_tests" not in proc.stdout


@pytest.mark.interpret
def test_a_part_stopped_at_its_limit_keeps_what_it_measured(tmp_path):
    """bench_scan as gpu_check.sh's `timeout` stops it (SIGTERM) once its first timed row is in: the record
    holds the rows so far, says it is not complete, and the summary names the part partial and what is missing."""
    import signal
    import sys
    import time

    record = tmp_path / "bench_scan_interpret.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_scan.py"), "--device", "interpret",
                             "--dtypes", "fp32", "--reps", "1", "--batch", "1", "--out", str(record)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = (json.loads(record.read_text()).get("rows", []) if record.exists() else [])
            if rows:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    saved = json.loads(record.read_text())
    assert saved["complete"] is False and saved["correctness"] and "ceilings" in saved
    assert 1 <= len(saved["rows"]) < len(saved["plan"]) and len(saved["done"]) == len(saved["rows"])
    assert saved["done"][0] == "search fp32 a_fused_triton fwd"
    status = tmp_path / "status"
    status.write_text("bench_scan 124 30\n")
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), "--tag", "interpret",
                              "--results", str(tmp_path), "--status", str(status), "--junit", str(tmp_path / "none.xml"),
                              "--run", str(tmp_path / "none")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    line = next(x for x in summary.stdout.splitlines() if x.startswith("bench_scan"))
    assert "time out" in line, summary.stdout
    partial = [x for x in summary.stdout.splitlines() if "PARTIAL: stopped before its end" in x]
    assert len(partial) == 1 and f"{len(saved['rows'])} of {len(saved['plan'])} rows measured" in partial[0]
    missing = [p for p in saved["plan"] if p not in saved["done"]]
    assert f"missing: {missing[0]}; " in partial[0], partial
