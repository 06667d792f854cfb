"""Per-layer direction lists: the published ones (package data), arch YAML files, and validation.

A direction list has one entry per layer (LocalVim) or per block, stage after stage (LocalVMamba);
each entry lists the scan directions that layer runs. The position of a direction inside its layer's
list is its slot ``k`` in the checkpoint keys (``A_log_{k}``, row ``k`` of ``x_proj_weight``, ...),
so lists are kept in the order given; the tool itself always writes them in ``DIRECTIONS`` order.
"""
from __future__ import annotations

import functools
import os
from importlib import resources

import yaml

from nas.errors import UserError
from nas.ops import DIRECTIONS, registered_scans


@functools.lru_cache(maxsize=None)
def _published() -> dict:
    text = resources.files("nas.models").joinpath("published_directions.yaml").read_text()
    data = yaml.safe_load(text)
    return {name: tuple(tuple(layer) for layer in lists) for name, lists in data.items() if name != "source"}


def published_directions(name: str) -> list[list[str]]:
    """The published searched directions of a model (e.g. ``"local_vim_tiny"``), one list per layer."""
    table = _published()
    if name not in table:
        raise UserError(f"published directions: no list named {name!r}; available: {', '.join(sorted(table))}")
    return [list(layer) for layer in table[name]]


def published_names() -> list[str]:
    return sorted(_published())


def read_arch_file(path) -> list:
    """The ``directions`` of an arch YAML file ``{model: ..., directions: [[...], ...], ...}`` (or a bare list)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"directions: arch file {path!r} not found (expected a YAML file with a 'directions' list, "
                        f"or one of the published names: {', '.join(published_names())})")
    with open(path) as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        if "directions" not in data:
            raise UserError(f"directions: arch file {path!r} has no 'directions' key (keys: {', '.join(map(str, data))})")
        data = data["directions"]
    return data


def resolve_directions(directions) -> list:
    """A per-layer list as given, read from an arch file path, or looked up by published name."""
    if isinstance(directions, (str, os.PathLike)):
        if isinstance(directions, str) and directions in _published():
            return published_directions(directions)
        return read_arch_file(directions)
    return directions


def check_candidates(candidates) -> tuple[str, ...]:
    """A search space's candidate scans (``search.candidates``): None is LocalMamba's 8 (``DIRECTIONS``), else a
    list of distinct registered scan orders, kept in the order given (alpha has one entry per candidate)."""
    if candidates is None:
        return tuple(DIRECTIONS)
    if isinstance(candidates, str) or not isinstance(candidates, (list, tuple)) or len(candidates) < 2:
        raise UserError(f"search.candidates: expected a list of at least 2 scan orders, got {candidates!r}")
    for name in candidates:
        if name not in registered_scans():
            raise UserError(f"search.candidates: unknown scan order {name!r}; registered: "
                            f"{', '.join(registered_scans())}")
    repeated = sorted({n for n in candidates if list(candidates).count(n) > 1})
    if repeated:
        raise UserError(f"search.candidates: {', '.join(repeated)} listed more than once")
    return tuple(candidates)


def check_directions(directions, num_layers: int, k: int, model: str = "model") -> list[tuple[str, ...]]:
    """Validate a per-layer direction list; return it as a list of tuples.

    Raises ValueError with a one-line message naming the bad value and what was expected.
    """
    if not isinstance(directions, (list, tuple)):
        raise UserError(f"directions: expected a list of {num_layers} per-layer lists of {k} scan directions "
                        f"for {model}, got {type(directions).__name__} {directions!r:.80}")
    if len(directions) != num_layers:
        raise UserError(f"directions: expected {num_layers} per-layer lists (one per layer of {model}), "
                        f"got {len(directions)}")
    if isinstance(k, (list, tuple)) and len(k) != num_layers:
        raise UserError(f"scans_per_layer: expected one count per layer of {model} ({num_layers}), got {list(k)}")
    checked = []
    for i, layer in enumerate(directions):
        if isinstance(layer, str) or not isinstance(layer, (list, tuple)):
            raise UserError(f"directions[{i}]: expected a list of {k} scan directions, got {layer!r}")
        layer = tuple(layer)
        for name in layer:
            if name not in registered_scans():
                raise UserError(f"directions[{i}]: unknown scan direction {name!r} in {list(layer)}; "
                                f"expected registered scan orders ({', '.join(registered_scans())})")
        want = k[i] if isinstance(k, (list, tuple)) else k  # scans_per_layer: one count, or one per layer
        if len(layer) != want:
            raise UserError(f"directions[{i}]: expected {want} directions per layer, got {len(layer)}: {list(layer)}")
        seen = set()
        for name in layer:
            if name in seen:
                raise UserError(f"directions[{i}]: direction {name!r} appears more than once in {list(layer)}; "
                                f"each layer needs {want} different directions")
            seen.add(name)
        checked.append(layer)
    return checked
