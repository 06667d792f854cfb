"""Helpers every benchmark shares: the machine and versions a record was taken on, the record itself, and
memory readings."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from nas.atomic import atomic_write


def check_interpret_env(device: str) -> None:
    """--device interpret needs TRITON_INTERPRET=1 before triton loads: say so in one line and exit 2."""
    if device == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device interpret: set TRITON_INTERPRET=1 in the environment (it must be set before triton loads)",
              file=sys.stderr)
        sys.exit(2)


def current_rss_kb() -> int:
    """Resident memory of this process now, in KiB (ru_maxrss reads the peak in the same unit)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


class Record:
    """A benchmark's JSON record, written when the benchmark starts and rewritten (atomically) after every row,
    so that a run stopped at its time limit keeps what it measured. ``plan`` lists the labels of the rows it
    means to measure and ``done`` those measured (or failed), so a reader can say what is missing; ``complete``
    turns true, and ``seconds`` is set, only when the benchmark finishes."""

    def __init__(self, path, benchmark: str, device: str, env: dict, **fields):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = time.perf_counter()
        self.data = {"benchmark": benchmark, "device": device, "environment": env,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False, "plan": [], "done": [],
                     **fields}
        self.write()

    def add(self, key: str, row: dict, label: str | None = None, **fields) -> dict:
        """Append ``row`` to the list ``key`` (``label`` to ``done``), set ``fields``, and write."""
        self.data.setdefault(key, []).append(row)
        if label is not None:
            self.data["done"].append(label)
        self.data.update(fields)
        self.write()
        return row

    def missing(self) -> list[str]:
        return [p for p in self.data["plan"] if p not in self.data["done"]]

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def finish(self) -> None:
        self.update(complete=True, seconds=time.perf_counter() - self._start)
        print(f"\nwrote {self.path}")

    def write(self) -> None:
        with atomic_write(str(self.path)) as f:
            json.dump(self.data, f, indent=1)


def best_rate(fn, n: int, reps: int = 10) -> float:
    """Values per second of fn() over n values: the best of 3 runs of `reps` calls."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t0)
    return n * reps / best


def cpu_throughput() -> dict:
    """This machine's throughput, in PyTorch at the current thread count, of exp2 and of a fused
    multiply-add (in-place addcmul_): the best over sizes from 64 K to 4 M values (small sizes pay the
    per-op overhead, large ones the memory bandwidth; the best is what the arithmetic itself allows)."""
    exp2 = fma = 0.0
    for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22):
        a, b, c = (torch.rand(n) for _ in range(3))
        out = torch.empty(n)
        reps = max(2, (1 << 22) // n)
        exp2 = max(exp2, best_rate(lambda: torch.exp2(a, out=out), n, reps))
        fma = max(fma, best_rate(lambda: c.addcmul_(a, b), n, reps))
    return {"exp2_per_s": exp2, "fma_per_s": fma}


# Per state value (batch x channel x N) and time step, a selective scan's forward computes one decay
# exp(delta * A), the input term delta * u * B (1 multiply), the update h = a * h + b (1 FMA) and the
# output <C, h> (1 FMA). A backward that keeps memory at O(state x L / chunk) recomputes the decays and
# the states (1 exp, 2), runs the adjoint g = a * g + C * dy (2), reduces dC, dB and d(delta u) (3),
# forms a * g * h_prev (2) and reduces it into dA and d delta (2).
SCAN_EXPS = {"fwd": 1, "fwdbwd": 2}
SCAN_FMAS = {"fwd": 3, "fwdbwd": 3 + 11}


def scan_floor_ms(state_steps: int, mode: str, rates: dict) -> dict:
    """The arithmetic floor of a scan over `state_steps` (state values x time steps): its exponentials
    at the measured exp2 rate plus its multiply-adds at the measured FMA rate."""
    exps, fmas = SCAN_EXPS[mode] * state_steps, SCAN_FMAS[mode] * state_steps
    exp_ms, fma_ms = 1e3 * exps / rates["exp2_per_s"], 1e3 * fmas / rates["fma_per_s"]
    return {"exps": exps, "fmas": fmas, "exp_ms": exp_ms, "fma_ms": fma_ms, "floor_ms": exp_ms + fma_ms}


def mambapy_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """Our selective_scan contract computed the way mambapy's Mamba does (mambapy.mamba.MambaBlock.
    selective_scan): exp(delta * A) and delta * B * u for every step materialized as (batch, L, D, N),
    mambapy's parallel scan (pscan, with its own backward) over time, then <C, h>. Grouped B and C are
    broadcast over their groups' channels."""
    from mambapy.pscan import pscan

    batch, dim, L = u.shape
    N = A.shape[1]
    x, dt = u.float().transpose(1, 2), delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    dt = dt.transpose(1, 2)  # (batch, L, D)
    G = 1 if B.dim() == 3 else B.shape[1]
    Bt, Ct = (X.float().reshape(batch, G, N, L).permute(0, 3, 1, 2).unsqueeze(3) for X in (B, C))  # (b, L, G, 1, N)
    decay = torch.exp(dt.unsqueeze(-1) * A.float())  # (batch, L, D, N)
    inputs = ((dt * x).view(batch, L, G, dim // G, 1) * Bt).view(batch, L, dim, N)
    hs = pscan(decay, inputs)
    y = (hs.view(batch, L, G, dim // G, N) * Ct).sum(-1).view(batch, L, dim)
    if D is not None:
        y = y + D.float() * x
    if z is not None:
        y = y * torch.nn.functional.silu(z.float().transpose(1, 2))
    y = y.transpose(1, 2).to(u.dtype)
    return (y, hs[:, -1]) if return_last_state else y
