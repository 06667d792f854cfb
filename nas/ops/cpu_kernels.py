"""The compiled CPU kernels (``csrc/``: the selective scan, the causal conv): built on first use, cached, loaded.

They are compiled with the C compiler ($CC, else cc) into a cache folder ($NAS_CACHE_DIR, else
$XDG_CACHE_HOME/scan-direction-nas, else ~/.cache/scan-direction-nas), one file per source, flags,
compiler and CPU kind, written atomically, so concurrent processes and later runs share it. Without a
compiler the callers use their PyTorch code instead, and say why once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from nas.atomic import WriteError, atomic_write
from nas.ops.scan_torch import LOG2E, SOFTPLUS_THRESHOLD

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
UNITS = (CSRC / "scan_cpu.c", CSRC / "causal_conv_cpu.c")  # compiled together into one library
SOURCES = (*UNITS, CSRC / "scan_cpu_body.h", CSRC / "causal_conv_body.h", CSRC / "vec_math.h")
FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-pthread",
         f"-DLOG2E={LOG2E!r}", f"-DSOFTPLUS_THRESHOLD={SOFTPLUS_THRESHOLD!r}"]
# -march=native lets the compiler use the machine's widest vectors; tried first, dropped if refused
NATIVE = ["-march=native"]


def cache_dir() -> Path:
    if os.environ.get("NAS_CACHE_DIR"):
        return Path(os.environ["NAS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scan-direction-nas"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _compile(cc: str, out: Path, extra: tuple[str, ...]) -> None:
    """Compile the kernels in a temporary folder, then write it to `out` atomically (concurrent builders
    each write a whole file; a reader never loads half of one)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(tmp) / "cpu_kernels.so"
        error = ""
        for native in (NATIVE, []):
            cmd = [cc, *FLAGS, *native, *extra, *map(str, UNITS), "-o", str(so), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        else:
            raise OSError(f"{os.environ.get('CC', 'cc')} failed: {error}")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(str(out), "wb") as f:
                f.write(so.read_bytes())
        except WriteError as e:
            raise OSError(str(e)) from None


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared by machines keeps one build per CPU kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def build(directory: Path, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernels compiled with FLAGS (+ `extra`) into `directory` (reused when already there), loaded.
    Raises OSError naming the problem."""
    cc = _compiler()
    if cc is None:
        raise OSError(f"no C compiler found ({os.environ.get('CC', 'cc')!r} is not on PATH; set CC)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256()
        for part in [*(p.read_bytes() for p in SOURCES), " ".join(FLAGS + NATIVE + list(extra)).encode(),
                     version.encode(), platform.machine().encode(), _cpu_flags().encode()]:
            key.update(part)
        path = Path(directory) / f"cpu_kernels-{key.hexdigest()[:16]}.so"
        if not path.exists():
            _compile(cc, path, extra)
    except subprocess.SubprocessError as e:
        raise OSError(f"{os.environ.get('CC', 'cc')} failed: {e}") from None
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {"scan_forward": [p] * 10 + [i64] * 7 + [i32] * 2, "scan_backward": [p] * 18 + [i64] * 7 + [i32] * 2,
                  "conv_forward": [p] * 4 + [i64] * 4 + [i32], "conv_backward": [p] * 7 + [i64] * 4 + [i32]}
    for name, args in signatures.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, i32
    return lib


@functools.lru_cache(maxsize=None)
def library() -> tuple[ctypes.CDLL | None, str]:
    """The kernels from the cache folder (built if needed), or None and the reason they are not available."""
    try:
        return build(cache_dir()), ""
    except OSError as e:
        return None, str(e)


def available() -> bool:
    return library()[0] is not None


def problem() -> str:
    """Why the kernels are not available ('' when they are)."""
    return library()[1]


def _suffix(dtype: torch.dtype) -> str:
    return "f64" if dtype == torch.float64 else "f32"


def lanes(dtype: torch.dtype) -> int:
    """Values of `dtype` in one vector of the built kernels (channels per vector of the scan)."""
    return getattr(library()[0], f"lanes_{_suffix(dtype)}")()


def run(name: str, dtype: torch.dtype, *args) -> None:
    """Call kernel `name` ("scan_forward", "conv_backward", ...) in `dtype`'s version: tensors are passed as
    their data pointers (None as NULL), then PyTorch's intra-op thread count (the run's choice, see
    ``nas.engine.threads``). MemoryError if the kernel could not allocate its work buffers."""
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    if getattr(library()[0], f"{name}_{_suffix(dtype)}")(*ptrs, torch.get_num_threads()) != 0:
        raise MemoryError(f"{name}: the CPU kernel could not allocate its work buffers")


@functools.lru_cache(maxsize=None)
def note_fallback() -> None:
    """Say once per process that PyTorch code stands in for the kernels, and why."""
    log.warning("no compiled CPU kernels (%s); using the slower PyTorch scan (backend 'torch') and conv",
                problem())


