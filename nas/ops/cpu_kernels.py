"""The compiled CPU kernels (``csrc/``: the selective scan, the causal conv): built on first use, cached, loaded.

They are compiled with the C compiler ($CC, else cc) into a cache folder ($NAS_CACHE_DIR, else
$XDG_CACHE_HOME/scan-direction-nas, else ~/.cache/scan-direction-nas), one file per source, flags,
compiler and CPU kind (what the compiler makes of -march=native), so concurrent processes and later runs
share it. Each file is written atomically with its size and hash beside it, checked before every load (a
truncated library would crash the process that maps it); a damaged one is rebuilt. Processes that start
together on an empty cache build once: the others wait on a lock file and load what it built. Without a
compiler the callers use their PyTorch code instead, and say why once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from nas.atomic import WriteError, atomic_write, exclusive_lock
from nas.ops.scan_torch import LOG2E, SOFTPLUS_THRESHOLD

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
UNITS = (CSRC / "scan_cpu.c", CSRC / "causal_conv_cpu.c")  # compiled together into one library
SOURCES = (*UNITS, CSRC / "scan_cpu_body.h", CSRC / "causal_conv_body.h", CSRC / "vec_math.h")
# an undeclared function is an error: C89 rules would call it through a truncated int and build a library that
# crashes (a strict -std in $CC hides declarations)
FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-pthread",
         "-Werror=implicit-function-declaration", f"-DLOG2E={LOG2E!r}", f"-DSOFTPLUS_THRESHOLD={SOFTPLUS_THRESHOLD!r}"]
# -march=native lets the compiler use the machine's widest vectors; tried first, dropped if refused
NATIVE = ["-march=native"]


def cache_dir() -> Path:
    if os.environ.get("NAS_CACHE_DIR"):
        return Path(os.environ["NAS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "scan-direction-nas"


def _compiler() -> tuple[list[str], str]:
    """The compiler's command and $CC as written. $CC is split into words as make and setuptools do ("ccache
    gcc", "gcc -std=c99"); its program must be on PATH (OSError naming it otherwise)."""
    written = os.environ.get("CC") or "cc"
    try:
        words = shlex.split(written)
    except ValueError as e:
        raise OSError(f"CC={written!r} cannot be split into words ({e})") from None
    program = shutil.which(words[0]) if words else None
    if program is None:
        raise OSError(f"no C compiler found ({(words or [written])[0]!r} is not on PATH; set CC)")
    return [program, *words[1:]], written


def _first_error(stderr: str, returncode: int) -> str:
    """The compiler's first line that says ``error:`` (what went wrong, not the "compilation terminated." or
    caret lines after it); else its last line; else the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[-1] if lines else f"exit status {returncode}")


def native_target(cc: list[str]) -> str:
    """What -march=native means to this compiler on this machine, as its driver resolves it (``-###``): gcc's
    ``-march=CPU -mavx2 -mno-avx512f ...``, clang's ``-target-cpu CPU -target-feature +avx2 ...``; '' if it does
    not say. On any OS (unlike /proc/cpuinfo), so a cache shared by machines keeps one build per CPU kind."""
    try:
        done = subprocess.run([*cc, *NATIVE, "-###", "-E", "-"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    words = []
    for line in done.stderr.splitlines():
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            if token in ("-target-cpu", "-target-feature"):
                words += tokens[i:i + 2]
            elif token.startswith("-m") and token != "-march=native":
                words.append(token)
    return " ".join(words)


def _compile(cc: list[str], written: str, out: Path, extra: tuple[str, ...]) -> None:
    """Compile the kernels in a temporary folder, then write them to `out` and their size and hash beside it
    (``_digest_path``), each atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(tmp) / "cpu_kernels.so"
        error = ""
        for native in (NATIVE, []):
            done = subprocess.run([*cc, *FLAGS, *native, *extra, *map(str, UNITS), "-o", str(so), "-lm"],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
            error = _first_error(done.stderr, done.returncode)
        else:
            raise OSError(f"{written} failed: {error}")
        if not so.is_file() or so.stat().st_size == 0:
            raise OSError(f"{written} wrote no library (exit status 0, no {so.name}); is CC a C compiler?")
        data = so.read_bytes()
    with atomic_write(str(out), "wb") as f:
        f.write(data)
    with atomic_write(str(_digest_path(out))) as f:  # last: until it is there, the library counts as damaged
        f.write(_digest(data))


def _digest(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """The cached library is whole: its size and hash are the ones written beside it when it was built (a file
    cut short by an interrupted copy or sync would crash the process that loads it)."""
    try:
        return _digest_path(path).read_text() == _digest(path.read_bytes())
    except OSError:
        return False


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {"scan_forward": [p] * 10 + [i64] * 7 + [i32] * 2, "scan_backward": [p] * 18 + [i64] * 7 + [i32] * 2,
                  "conv_forward": [p] * 4 + [i64] * 4 + [i32], "conv_backward": [p] * 7 + [i64] * 4 + [i32]}
    try:
        for name, args in signatures.items():
            for suffix in ("f32", "f64"):
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = args, i32
    except AttributeError as e:  # a library of other sources
        raise OSError(str(e)) from None
    return lib


def cache_path(directory: Path, extra: tuple[str, ...] = ()) -> Path:
    """Where in `directory` the kernels built with FLAGS (+ `extra`) by $CC for this machine are cached: a name
    that changes with the sources, the flags, the compiler and the CPU it resolves -march=native to."""
    cc, written = _compiler()
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except subprocess.SubprocessError as e:
        raise OSError(f"{written} failed: {e}") from None
    key = hashlib.sha256()
    for part in [*(p.read_bytes() for p in SOURCES), " ".join(FLAGS + NATIVE + list(extra)).encode(),
                 " ".join(cc).encode(), version.encode(), platform.machine().encode(), native_target(cc).encode()]:
        key.update(part)
    return Path(directory) / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def build(directory: Path, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The kernels compiled with FLAGS (+ `extra`) into `directory` (``cache_path``; reused when already there
    and intact), loaded. A damaged cached file, or one that does not load, is rebuilt once; processes starting
    together build once (the others wait on a lock file beside it). Raises OSError naming the problem."""
    path = cache_path(directory, extra)
    cc, written = _compiler()
    for attempt in range(2):
        if attempt or not _intact(path):
            _rebuild(cc, written, path, extra, force=attempt > 0)
        try:
            return _load(path)
        except OSError as e:
            if attempt:
                raise OSError(f"{path}: the rebuilt kernels do not load ({str(e).splitlines()[0]})") from None


def _rebuild(cc: list[str], written: str, path: Path, extra: tuple[str, ...], force: bool) -> None:
    """Build `path` under its lock; a process that waited there finds it built (unless `force`: it did not load)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{path.parent}: cannot make the cache folder ({e.strerror or e})") from None
    try:
        with exclusive_lock(str(path.with_suffix(".lock"))):
            if force or not _intact(path):
                _compile(cc, written, path, extra)
    except WriteError as e:
        raise OSError(str(e)) from None
    except subprocess.SubprocessError as e:  # a compile that ran past its time
        raise OSError(f"{written} failed: {e}") from None


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


