"""bench_supernet.py's CPU path end to end at a tiny setting (the demo supernet, batch 2, one step, no layer
table): every path runs, the batched and loop paths on the compiled kernel, the torch path on the PyTorch
scan, and the record holds the floors and ratios. Its timings mean nothing here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nas.ops import cpu_kernels

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_supernet.py"


@pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernel")
def test_cpu_path_runs_every_path(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "vim_demo", "--batch", "2", "--steps", "1",
                           "--warmup", "1", "--threads", "1", "--no-layers", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["environment"]["cpu_kernel"] == "built" and record["rates"]["exp2_per_s"] > 0
    rows = {r["path"]: r for r in record["rows"]}
    assert set(rows) == {"batched", "loop", "torch", "mambapy"}
    functions = {path: r["scan_function"] for path, r in rows.items()}
    assert functions == {"batched": "selective_scan_cpu", "loop": "selective_scan_cpu",
                         "torch": "selective_scan_torch", "mambapy": "mambapy_selective_scan"}
    for r in rows.values():
        assert r["loss_finite"] and r["threads"] == 1 and r["scan_calls"] > 0
        assert r["step_over_floor"] == pytest.approx(r["ms_median"] / r["floor_ms"])
    (ratio,) = record["ratios"]
    assert {"loop_over_batched", "torch_over_batched", "mambapy_over_batched"} <= set(ratio)
