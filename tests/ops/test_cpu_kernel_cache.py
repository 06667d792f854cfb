"""The compiled CPU kernels' build cache, tried the way damaged home folders, shared caches and busy machines
try it: a truncated cached library (which crashed the loading process with a bus error) and one that does not
load are rebuilt; the cache key follows what the compiler makes of -march=native; $CC is split into words as
make does; the compiler's first error is the one shown; processes racing on an empty cache build once."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nas.ops import cpu_kernels

if not cpu_kernels.available():  # pragma: no cover - the CI machine has a compiler
    pytest.skip(f"no CPU kernel: {cpu_kernels.problem()}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
# a fresh process loads the kernels from $NAS_CACHE_DIR and runs the scan once against the reference
LOAD = """
import torch
from nas.ops import cpu_kernels, selective_scan
lib, why = cpu_kernels.library()
if lib is None:
    raise SystemExit(why)
g = torch.Generator().manual_seed(0)
u, dt, z = (torch.randn(2, 20, 9, generator=g) for _ in range(3))
A, B, C = -torch.rand(20, 3, generator=g), torch.randn(2, 3, 9, generator=g), torch.randn(2, 3, 9, generator=g)
y, want = (selective_scan(u, dt, A, B, C, z=z, delta_softplus=True, backend=b) for b in ("cpu", "ref"))
torch.testing.assert_close(y, want, rtol=6e-4, atol=2e-3)
print("loaded", lib._name)
"""


def _python(code: str, cache: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "NAS_CACHE_DIR": str(cache), **env})


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    return out


@pytest.fixture(scope="module")
def built() -> Path:
    """This machine's cached build (the library and its size and hash), which the tests that damage it copy."""
    assert cpu_kernels.available()
    return cpu_kernels.cache_path(cpu_kernels.cache_dir())


def _library(built: Path, tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    for path in (built, cpu_kernels._digest_path(built)):
        shutil.copy(path, tmp_path / "cache" / path.name)
    return tmp_path / "cache" / built.name


def test_a_truncated_cached_library_is_rebuilt_in_the_process_that_finds_it(built, tmp_path):
    """Cut at 40 KB (an interrupted sync): loading it was a bus error in every later process."""
    so = _library(built, tmp_path)
    size = so.stat().st_size
    so.write_bytes(so.read_bytes()[:40_000])
    assert _finish(_python(LOAD, so.parent)).split() == ["loaded", str(so)]
    assert so.stat().st_size == size and cpu_kernels._intact(so)


def test_a_cached_library_that_does_not_load_is_rebuilt_once(built, tmp_path):
    """A file whose recorded size and hash match but that is no library (written so by hand or by another
    tool): the load fails, so it is rebuilt once; then it loads."""
    so = _library(built, tmp_path)
    size = so.stat().st_size
    so.write_bytes(b"not a shared library")
    cpu_kernels._digest_path(so).write_text(cpu_kernels._digest(so.read_bytes()))
    cpu_kernels.build(so.parent)
    assert so.stat().st_size == size and cpu_kernels._intact(so)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_processes_racing_on_an_empty_cache_build_once(tmp_path):
    """Three processes start together; $CC is a launcher in front of the compiler with a flag of its own
    ("ccache gcc"-like, plus -std=c99), which logs every compile: one builds, the others wait and load it."""
    log = tmp_path / "compiles.log"
    launcher = _script(tmp_path / "launcher", f'case " $* " in *" -o "*) echo $$ >> {log};; esac\nexec "$@"\n')
    cc = f"{launcher} {shutil.which('gcc') or shutil.which('cc')} -std=c99"
    cache = tmp_path / "cache"
    procs = [_python(LOAD, cache, CC=cc) for _ in range(3)]
    loaded = {_finish(p).split()[1] for p in procs}
    assert len(log.read_text().split()) == 1
    (so,) = cache.glob("cpu_kernels-*.so")
    assert loaded == {str(so)} and cpu_kernels._intact(so)


def _fake_compiler(tmp_path: Path, resolution: str) -> Path:
    """A compiler whose driver resolves -march=native to `resolution` (printed as gcc and clang print it)."""
    return _script(tmp_path / "fakecc", f'for a in "$@"; do [ "$a" = "-###" ] && {{ echo \' {resolution}\' >&2; '
                                        f'exit 0; }}; done\necho "fakecc 1.0"\n')


def test_the_cache_key_follows_the_compilers_resolution_of_march_native(tmp_path, monkeypatch):
    """Two CPUs of one kind of machine (same OS, same /proc/cpuinfo or none) on which the compiler resolves
    -march=native differently get two builds: a build for one would die of SIGILL on the other."""
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path, '/x/cc1 -E - "-march=haswell" -mavx2 -mno-avx512f')))
    haswell = cpu_kernels.cache_path(tmp_path)
    assert cpu_kernels.native_target(cpu_kernels._compiler()[0]) == "-march=haswell -mavx2 -mno-avx512f"
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path, '/x/cc1 -E - "-march=skylake-avx512" -mavx2 -mavx512f')))
    assert cpu_kernels.cache_path(tmp_path) != haswell
    clang = '"/x/clang" "-cc1" "-target-cpu" "znver3" "-target-feature" "+avx2" "-target-feature" "-avx512f"'
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path, clang)))
    assert cpu_kernels.native_target(cpu_kernels._compiler()[0]) == \
        "-target-cpu znver3 -target-feature +avx2 -target-feature -avx512f"


def test_the_real_compilers_resolution_names_the_cpu(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    resolved = cpu_kernels.native_target(cpu_kernels._compiler()[0])
    assert ("-march=" in resolved or "-target-cpu" in resolved) and "-march=native" not in resolved


@pytest.mark.parametrize("cc,problem", [
    # the compiler's first error (then "compilation terminated.", which was the line shown)
    ("gcc -include {tmp}/missing.h", "gcc -include {tmp}/missing.h failed: .*fatal error: {tmp}/missing.h: No such "
                                     "file or directory"),
    ("/bin/true", "/bin/true wrote no library \\(exit status 0, no cpu_kernels.so\\); is CC a C compiler\\?"),
    ("'unclosed", "CC=\"'unclosed\" cannot be split into words \\(No closing quotation\\)"),
])
def test_a_failed_build_is_one_line_naming_the_compiler_and_its_first_error(tmp_path, monkeypatch, cc, problem):
    monkeypatch.setenv("CC", cc.format(tmp=tmp_path))
    with pytest.raises(OSError) as caught:
        cpu_kernels.build(tmp_path / "cache")
    assert re.fullmatch(problem.format(tmp=tmp_path), str(caught.value)), str(caught.value)
