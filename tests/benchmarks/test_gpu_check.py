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
PARTS = ["triton_tests", "bench_supernet", "bench_search", "search_run", "bench_scan"]


@pytest.mark.interpret
def test_suite_runs_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "GPU_CHECK_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "interpret"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "gpu_check_interpret.json").read_text())
    assert list(summary["status"]) == PARTS and all(s["exit"] == 0 for s in summary["status"].values())
    assert all(summary["summary"][p] for p in PARTS)  # every part's numbers were read from its record
    for name in ("bench_supernet", "bench_search", "bench_scan"):
        assert json.loads((tmp_path / f"{name}_interpret.json").read_text())["device"] == "interpret"
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
