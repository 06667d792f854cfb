"""Helpers every benchmark shares: the machine and versions a record was taken on, and memory readings."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


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
