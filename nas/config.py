"""YAML run configs with command-line overrides, validated against a tree of defaults.

A config is a nested dict. Its file holds only what differs from the defaults; every key can be
overridden on the command line as ``--section.key VALUE`` or ``section.key=VALUE`` (values parsed as
YAML, so ``--train.lr 3e-4``, ``--data.classes '[n01440764, n01443537]'`` and ``--train.clip_grad null``
work). A key that is not in the defaults is an error naming the key and listing the valid ones. The
resolved config is written with each run (``config.yaml``).
"""
from __future__ import annotations

import copy
import os
import re

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
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
            if parent is None:
                raise ConfigError(f"{source}: unknown key {dotted!r}; valid keys: {', '.join(sorted(valid))}")
            _set_path(cfg, parent.split(".") + dotted[len(parent) + 1:].split("."), value)
            continue
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
        node[leaf] = value
    return out


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config: file {path!r} not found")
    try:
        with open(path) as f:
            data = _load(f.read()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def resolve(defaults: dict, path: str | None, overrides: dict) -> dict:
    """Defaults, then the YAML file, then the command-line overrides."""
    cfg = defaults
    if path is not None:
        cfg = merge(cfg, load_yaml(path), path)
    return merge(cfg, overrides, "command line", schema=defaults)


def save(cfg: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)
