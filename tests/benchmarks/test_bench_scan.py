"""bench_scan.py's GPU code path, run end to end on CPU under the Triton interpreter at tiny sizes
(--device interpret): correctness check, ceilings, every variant, floors, ratios and the JSON record.
Its timings mean nothing; this guards the script that a GPU session runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_scan.py"


@pytest.mark.interpret
def test_gpu_path_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "interpret", "--dtypes", "fp32", "--reps", "1",
                           "--batch", "1", "--out", str(out)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] == "interpret" and record["environment"]["triton"]
    assert {(c["case"], c["dtype"]) for c in record["correctness"]} == {("search", "fp32"), ("derived", "fp32")}
    for check in record["correctness"]:  # fused kernel vs the float64 reference, output and every gradient
        assert set(check["rel_err"]) == {"y", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"}
        assert max(check["rel_err"].values()) < 1e-4, check
    assert record["ceilings"]["copy_bytes_per_s"] > 0 and record["ceilings"]["exp2_per_s"] > 0
    assert not record["mamba_available"]
    got = {(r["case"], r["variant"], r["mode"]) for r in record["rows"]}
    want = {(case, variant, mode) for case in ("search", "derived") for mode in ("fwd", "fwdbwd")
            for variant in ("a_fused_triton", "b_triton_x_permuted", "d_torch_backend")}
    assert got == want
    for r in record["rows"]:
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["ms"])
    assert {(r["case"], r["mode"]) for r in record["ratios"]} == {(c, m) for c in ("search", "derived")
                                                                  for m in ("fwd", "fwdbwd")}
    assert all(r["b_triton_x_permuted_over_a"] > 0 for r in record["ratios"])


def test_interpret_without_the_variable_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "interpret", "--out", str(tmp_path / "x.json")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("--device interpret: set TRITON_INTERPRET=1 in the environment "
                                   "(it must be set before triton loads)")
    assert not (tmp_path / "x.json").exists()
