"""The package's structure: layers import one way, user mistakes share one error type, Optuna only through its
public API, and files are written through the one atomic helper."""
import ast
import importlib
import inspect
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import nas
from nas.errors import UserError

ROOT = pathlib.Path(nas.__file__).parent
# bottom to top: a module may import its own layer and the ones before it, never one after it
LAYERS = ("errors", "atomic", "config", "ops", "viz", "models", "data", "engine", "search", "derive", "tune", "cli")


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nas"


def nas_imports(path: pathlib.Path):
    """(line, imported nas module) of every import in a file, the ones inside functions included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nas" and node.level == 0:
            names = ["nas." + a.name for a in node.names] if node.module == "nas" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "nas"]
        else:
            continue
        for name in names:
            yield node.lineno, name


def modules():
    return sorted(p for p in ROOT.rglob("*.py"))


def test_every_module_belongs_to_a_declared_layer():
    found = {layer_of(".".join(p.relative_to(ROOT.parent).with_suffix("").parts)) for p in modules()}
    assert found - {"nas", "__init__"} <= set(LAYERS), found - set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path in modules():
        own = layer_of(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if own not in LAYERS:  # nas/__init__.py
            continue
        for line, name in nas_imports(path):
            target = layer_of(name)
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(own):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} ({own}) imports {name} ({target})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package, absent", [
    ("nas.search", ("nas.tune", "nas.cli", "optuna")),
    ("nas.derive.retrain", ("nas.tune", "nas.cli", "optuna")),
    ("nas.models", ("nas.engine", "nas.search", "nas.derive", "nas.tune", "nas.cli", "optuna")),
])
def test_importing_a_layer_loads_nothing_above_it(package, absent):
    code = f"import sys, {package}; print('\\n'.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = [m for m in loaded if any(m == a or m.startswith(a + ".") for a in absent)]
    assert not above, above


def test_no_private_optuna_name_is_used():
    private = re.compile(r"(from\s+optuna[\w.]*\s+import\s+_\w+|optuna(\.\w+)*\._\w+|\._trial_id\b|\._storage\b)")
    hits = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}" for p in modules()
            for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not hits, "\n".join(hits)


def test_every_error_class_of_the_package_is_a_user_error():
    """One type for user mistakes: every exception class defined in nas/ derives from UserError."""
    for info in pkgutil.walk_packages(nas.__path__, "nas."):
        if info.name.startswith("nas.ops.scan_triton"):  # needs triton; no exception classes there
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                assert issubclass(obj, UserError), f"{info.name}.{name} is not a UserError"


def test_only_the_command_layer_turns_errors_into_exit_codes():
    """The CLI catches user mistakes in one place (nas/cli/command.py); elsewhere a UserError may be caught only to
    add context and raise it again, never to print it and exit."""
    exits = re.compile(r"return 2\b|sys\.exit\(|except \(?Preempted")
    in_cli = re.compile(r"except .*(UserError|Error\b)")
    hits = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}" for p in modules() if p != ROOT / "cli" / "command.py"
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if exits.search(line) or (p.parent.name == "cli" and in_cli.search(line))]
    assert not hits, "\n".join(hits)


def test_files_are_written_through_the_atomic_helper():
    """No module opens a file for writing itself: run files go through nas.atomic.atomic_write (the append-only
    event log and the hard link that keeps the previous checkpoint are not rewrites of a file)."""
    writes = re.compile(r"open\([^)]*[\"'](w|wb|x|xb)[\"']|\.write_text\(|os\.replace\(")
    allowed = {"atomic.py", "checkpoint.py", "session.py", "scan_triton_aot.py"}
    hits = [f"{p.relative_to(ROOT.parent)}:{i}" for p in modules() if p.name not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if writes.search(line)]
    assert not hits, hits
