"""A run's ``arch.yaml`` as the retraining reads it: loaded, checked against its model, and compared with the
run's latest alphas (an arch file derived from older alphas, or with another -k, is stale).

A baseline's folder (``search.py --baseline KIND`` writes ``RUN/baselines/KIND/``) holds an ``arch.yaml`` chosen
without alphas and, beside it, ``search_config.yaml``: the search config it stands in for, which the retraining
takes its data, image size, seed and ``retrain:`` section from, as it does from a search run's ``config.yaml``."""
from __future__ import annotations

import os

import torch

from nas import config as cfglib
from nas.derive.export import DeriveError, kept_rule
from nas.errors import UserError
from nas.models import create_model
from nas.models.arch import read_arch_file

BASELINE_CONFIG = "search_config.yaml"


def baseline_config(folder: str) -> dict | None:
    """The search config of a baseline's folder, or None when ``folder`` is no baseline's folder."""
    path = os.path.join(folder, BASELINE_CONFIG)
    return cfglib.load_yaml(path, "run") if os.path.isfile(path) else None


def check_arch(arch: dict, directions, arch_path: str) -> None:
    """Build the derived model once so that a bad arch fails before any training (the model checks each
    layer's list against its own count of ``scans_per_layer``)."""
    try:
        if directions is None:  # create_model would take its published default directions
            raise UserError("directions: expected one list of scan directions per layer, got null")
        create_model(arch["model"], directions=directions, **arch["model_args"])
    except UserError as exc:
        raise DeriveError(f"arch: {arch_path}: {exc}") from None


def load_arch(arch_path: str) -> dict:
    """An arch file as the retraining reads it, checked against its model before any training."""
    arch = cfglib.load_yaml(arch_path, "arch")
    if "model" not in arch:
        raise DeriveError(f"arch: {arch_path!r} is not an arch file (expected keys model, directions, ...)")
    arch.setdefault("model_args", {})
    arch.setdefault("source", os.path.dirname(os.path.abspath(arch_path)))
    directions = read_arch_file(arch_path)
    if isinstance(directions, list) and directions and all(isinstance(d, list) for d in directions):
        # a file written by hand may leave out scans_per_layer: each layer runs the scans its list names
        counts = [len(d) for d in directions]
        if 0 in counts:
            raise DeriveError(f"arch: {arch_path}: directions[{counts.index(0)}]: expected at least one scan "
                              f"direction per layer, got []")
        arch["model_args"].setdefault("scans_per_layer", counts[0] if len(set(counts)) == 1 else counts)
    check_arch(arch, directions, arch_path)
    return arch


def stale_reason(arch: dict, run: dict, k: int | None, distinct: bool) -> str | None:
    """Why an existing arch.yaml is not the architecture asked for from the run's latest alphas, or None."""
    held = f"the {kept_rule(arch)}"
    if "epoch" in arch:
        held += f" of search epoch {arch['epoch']}"
        if arch["epoch"] != run["epoch"]:
            return f"holds {held}, but the run's latest alphas are from epoch {run['epoch']}"
    else:  # written before arch files recorded their epoch: compare its probabilities (6 decimals then)
        probs = torch.tensor(arch.get("probs") or [], dtype=torch.float64)
        if probs.shape != run["probs"].shape or (probs - run["probs"]).abs().max() > 1e-6:
            return (f"holds {held} of other probabilities than the run's latest alphas (epoch {run['epoch']}); "
                    f"it was derived before arch files recorded their epoch")
    if k is not None and k != arch.get("k"):
        return f"holds {held}, but -k {k} was asked"
    if distinct and not arch.get("distinct"):
        return f"holds {held}, but --distinct was asked"
    return None
