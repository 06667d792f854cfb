"""The run checkpoint: one dict, written atomically, read without running code.

``save`` writes to a temporary file in the same folder and renames it over the target, so a run killed
while writing leaves the previous checkpoint intact. ``load`` uses ``weights_only=True``: a checkpoint
holds tensors, numbers, strings and containers only (the RNG states below are stored that way too).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def save(state: dict, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: file {path!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is a user-facing problem
        raise ValueError(f"checkpoint: {path!r} could not be read as a checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def rng_state() -> dict:
    """Every generator a run draws from, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
