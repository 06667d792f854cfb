"""The run checkpoint: one dict, written atomically, read without running code.

``save`` writes through ``nas.atomic.atomic_write``, so a run killed while writing leaves the previous file
intact; with ``keep_previous`` the file it replaces stays beside it as ``prev.pt`` (a hard link, no copy),
so a ``last.pt`` damaged later (a bad disk, a truncated copy) costs one epoch, not the run. ``load`` uses
``weights_only=True``: a checkpoint holds tensors, numbers, strings and containers only (the RNG states
below are stored that way too); a file that cannot be read is a ``CheckpointError`` naming it.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil

import numpy as np
import torch

from nas.atomic import TEMP_MARK, atomic_write
from nas.errors import UserError

PREVIOUS = "prev.pt"


class CheckpointError(UserError):
    """A checkpoint file is missing, damaged or not one of ours."""


def save(state: dict, path: str, keep_previous: bool = False) -> None:
    if keep_previous and os.path.isfile(path):
        _keep_previous(path)
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _keep_previous(path: str) -> None:
    _link(path, os.path.join(os.path.dirname(path), PREVIOUS))  # without hard links best.pt stays the fallback


def _link(path: str, target: str) -> bool:
    """Make ``target`` a hard link to ``path`` in one step (a link under a temporary name, then a rename);
    False where the filesystem has no hard links."""
    link = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{TEMP_MARK}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    try:
        os.link(path, link)
        os.replace(link, target)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link)
        return False


def restore(path: str, target: str) -> None:
    """``target`` becomes the checkpoint ``path`` holds (a hard link, else an atomic copy): after a fallback
    the run folder has a readable last.pt again, even when nothing is left to train."""
    if not _link(path, target):
        with open(path, "rb") as src, atomic_write(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def load(path: str, require: tuple[str, ...] = ()) -> dict:
    """The dict stored in ``path``; ``require``: keys it must hold to be the kind of checkpoint asked for."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint: file {path!r} not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint: {path} could not be read (the file is empty)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is a user-facing problem
        # torch's own text suggests weights_only=False, which is wrong advice for a damaged file
        raise CheckpointError(f"checkpoint: {path} could not be read (damaged, truncated or not a checkpoint: "
                              f"{type(exc).__name__})") from None
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: {path} is not a run checkpoint (no {', '.join(missing)})")
    return state


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
