"""YAML run configs with command-line overrides, validated against a tree of defaults.

A config is a nested dict. Its file holds only what differs from the defaults; every key can be
overridden on the command line as ``--section.key VALUE`` or ``section.key=VALUE`` (values parsed as
YAML, so ``--train.lr 3e-4``, ``--data.classes '[n01440764, n01443537]'`` and ``--train.clip_grad null``
work). A key that is not in the defaults is an error naming the key and the closest valid ones; a value
of the wrong type or out of range is an error naming the key, what was expected and what was given
(``validate`` with the checks below). The resolved config is written with each run (``config.yaml``).
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from nas.atomic import atomic_write
from nas.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(UserError):
    """A user mistake in a config file or an override: one line, no traceback."""


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}. Free-form sections (dicts whose default is empty) stay whole."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _set_path(cfg: dict, keys: list[str], value) -> None:
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def closest_keys(key: str, valid) -> list[str]:
    """Up to three valid keys a mistyped ``key`` probably meant: a similar name in the same section, the same
    name in another section (``lr`` -> ``train.lr``), then a similar whole key (``trian.lr`` -> ``train.lr``)."""
    valid = sorted(valid)
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == section}
    found = [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.75)]
    found += [k for k in valid if k.rpartition(".")[2] == leaf]
    found += difflib.get_close_matches(key, valid, n=3, cutoff=0.85)
    return list(dict.fromkeys(found))[:3]


def unknown_key_message(source: str, key: str, valid) -> str:
    near = closest_keys(key, valid)
    if near:
        return f"{source}: unknown key {key!r}; did you mean {' or '.join(map(repr, near))}?"
    section = key.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in sorted(valid) if section and k.rpartition(".")[0] == section]
    if siblings:
        return f"{source}: unknown key {key!r}; the keys of {section} are {', '.join(siblings)}"
    return f"{source}: unknown key {key!r}; the top-level keys are {', '.join(sorted({k.split('.')[0] for k in valid}))}"


def merge(defaults: dict, updates: dict, source: str, schema: dict | None = None) -> dict:
    """A copy of ``defaults`` with ``updates`` (nested) applied; unknown keys raise ConfigError.

    schema: the tree that says which keys exist and which sections are free-form (default: ``defaults``);
    pass the original defaults when ``defaults`` already holds a file's values."""
    valid = flatten(schema if schema is not None else defaults)
    valid.update(flatten(defaults))
    cfg = copy.deepcopy(defaults)
    for dotted, value in flatten(updates).items():
        if dotted not in valid:
            # a whole free-form section given as a dict, e.g. model_args: {scattn: full}
            parent = next((k for k in valid if dotted.startswith(k + ".") and valid[k] == {}), None)
            if parent is not None:
                _set_path(cfg, parent.split(".") + dotted[len(parent) + 1:].split("."), value)
                continue
            inside = [k for k in valid if k.startswith(dotted + ".")]
            if inside:
                raise ConfigError(f"{source}: {dotted} is a section, not a value (got {value!r}); set its keys, "
                                  f"e.g. {inside[0]}")
            raise ConfigError(unknown_key_message(source, dotted, valid))
        _set_path(cfg, dotted.split("."), value)
    return cfg


def parse_overrides(tokens: list[str]) -> dict:
    """["--train.lr", "3e-4", "data.path=demo"] -> {"train": {"lr": 3e-4}, "data": {"path": "demo"}}."""
    out: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" not in tok:
            if i + 1 >= len(tokens):
                raise ConfigError(f"argument {tok}: expected a value after it")
            key, raw = tok[2:], tokens[i + 1]
            i += 2
        elif "=" in tok:
            key, raw = tok.lstrip("-").split("=", 1)
            i += 1
        else:
            raise ConfigError(f"argument {tok!r}: expected --section.key VALUE or section.key=VALUE")
        try:
            value = _load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.replace("-", "_").split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"argument --{key}: {'.'.join(parents)} was given a value earlier on the line")
        node[leaf] = value
    return out


def yaml_error_message(path: str, exc: yaml.YAMLError) -> str:
    """``path line L, column C: problem`` for a YAML syntax error (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{path}{where}: not valid YAML ({problem})"


def load_yaml(path: str, what: str = "config") -> dict:
    """The mapping a YAML file holds; a missing, unreadable or malformed file is a ConfigError naming it
    (with the line and column of a syntax error)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = _load(f.read())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: {yaml_error_message(path, exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path!r} ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def list_spaces(folder: str) -> list[str]:
    """The names of the search spaces (``*.yaml``) in ``folder``."""
    try:
        return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".yaml"))
    except OSError:
        return []


def find_config(name: str, spaces: str) -> str:
    """``-c`` as a path, or as the name of a file in the ``spaces`` folder (``localvim_t`` or
    ``localvim_t.yaml``)."""
    if os.path.isfile(name):
        return name
    if os.sep not in name:
        candidate = os.path.join(spaces, name if name.endswith((".yaml", ".yml")) else name + ".yaml")
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"-c: {name!r} is neither a config file nor a search space "
                      f"(search spaces: {', '.join(list_spaces(spaces)) or 'none'})")


def resolve(defaults: dict, path: str | None, overrides: dict) -> dict:
    """Defaults, then the YAML file, then the command-line overrides."""
    cfg = defaults
    if path is not None:
        cfg = merge(cfg, load_yaml(path), path)
    return merge(cfg, overrides, "command line", schema=defaults)


def save(cfg: dict, path: str) -> None:
    with atomic_write(path) as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


# -- value checks -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """What a setting must be: ``expected`` reads as the end of "expected ..."."""

    expected: str
    ok: Callable[[Any], bool]

    def or_none(self, meaning: str = "") -> Check:
        return Check(f"{self.expected} or null{f' ({meaning})' if meaning else ''}",
                     lambda v: v is None or self.ok(v))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _bounds(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"> {low}" if low_open else f">= {low}")
    if high is not None:
        parts.append(f"< {high}" if high_open else f"<= {high}")
    return " and ".join(parts)


def _within(v, low, high, low_open, high_open) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return high is None or (v < high if high_open else v <= high)


def integer(low: int | None = None, high: int | None = None) -> Check:
    if low is not None and high is not None:
        text = f"an int from {low} to {high}"
    else:
        text = f"an int {_bounds(low, high, False, False)}".rstrip()
    return Check(text, lambda v: _is_int(v) and _within(v, low, high, False, False))


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Check:
    return Check(f"a number {_bounds(low, high, low_open, high_open)}".rstrip(),
                 lambda v: _is_number(v) and _within(v, low, high, low_open, high_open))


def choice(*options) -> Check:
    return Check(f"one of {', '.join(map(str, options))}", lambda v: isinstance(v, str) and v in options)


def number_pair(low: float, high: float, high_open: bool = False) -> Check:
    return Check(f"[a, b] with {_bounds(low, high, False, high_open)}",
                 lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                 and all(_is_number(x) and _within(x, low, high, False, high_open) for x in v))


BOOLEAN = Check("true or false", lambda v: isinstance(v, bool))
TEXT = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v))
MAPPING = Check("a mapping of keys", lambda v: isinstance(v, dict))


def validate(cfg: dict, checks: dict[str, Check], prefix: str = "") -> None:
    """Check the values of ``cfg`` (nested) named by the dotted keys of ``checks``; the first bad one
    raises ConfigError ``key: expected ..., got ...``."""
    flat = flatten(cfg)
    for key, check in checks.items():
        if key in flat and not check.ok(flat[key]):
            raise ConfigError(f"{prefix}{key}: expected {check.expected}, got {flat[key]!r}")
