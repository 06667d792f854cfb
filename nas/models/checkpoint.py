"""Reading checkpoints (released LocalMamba files and ours) and inheriting supernet weights.

Every file is read with ``torch.load(..., map_location="cpu", weights_only=True)``: checkpoints come
from the internet and must never run code.
"""
from __future__ import annotations

import os
import pickle
import re

import torch
import torch.nn as nn

from nas.errors import UserError
from nas.models.local_vim import LocalVim
from nas.models.local_vmamba import LocalVMamba
from nas.models.registry import create_model
from nas.models.search_space import alpha_state_keys, derive_directions, search_candidates
from nas.models.ss2d import SS2D
from nas.models.vim_mixer import LocalVimMixer
from nas.ops import DIRECTIONS

_PREFIXES = ("module.", "_orig_mod.")


def _shorten(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _refused(err: pickle.UnpicklingError) -> str:
    """What torch's weights_only loader refused, as one plain line (its message spans lines, in terminal colours,
    and suggests weights_only=False)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return next((line.split("error:", 1)[1].split(". ")[0].strip() for line in text.splitlines()
                 if "WeightsUnpickler error:" in line), type(err).__name__)


def read_state_dict(path_or_state) -> dict[str, torch.Tensor]:
    """A flat state_dict from a file path or a loaded object.

    Accepts ``{"state_dict": ...}``, ``{"model": ...}`` or a raw state_dict; strips ``module.`` (DDP)
    and ``_orig_mod.`` (torch.compile) prefixes.
    """
    obj = path_or_state
    if isinstance(obj, (str, os.PathLike)):
        if not os.path.isfile(obj):
            raise UserError(f"checkpoint: file {os.fspath(obj)!r} not found")
        if os.path.getsize(obj) == 0:
            raise UserError(f"checkpoint: {os.fspath(obj)!r} could not be read (the file is empty)")
        try:
            obj = torch.load(obj, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain containers
            raise UserError(f"checkpoint: {os.fspath(path_or_state)!r} holds objects other than tensors and plain "
                            f"containers, which we refuse to unpickle ({_refused(err)})") from None
        except (RuntimeError, EOFError, ValueError) as err:  # a truncated zip, a cut pickle, a foreign file
            raise UserError(f"checkpoint: {os.fspath(path_or_state)!r} could not be read (damaged, truncated or not "
                            f"a checkpoint: {type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint: expected a state_dict or a dict holding 'state_dict' or 'model', "
                         f"got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"checkpoint: entry {key!r} is a {type(value).__name__}, not a tensor; expected a "
                             f"state_dict or a dict holding one under 'state_dict' or 'model'")
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a one-line UserError naming missing, unexpected and shape-mismatched keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) the model needs are missing from the checkpoint: {_shorten(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) in the checkpoint are not in the model: {_shorten(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} key(s) have another shape: {_shorten(mismatched, 3)}")
    name = getattr(model, "model_name", type(model).__name__)
    raise UserError(f"checkpoint: does not fit {name}: " + "; ".join(problems)
                     + " (another model, image size, class count or number of directions per layer?)")


def load_checkpoint(model: nn.Module, path_or_state) -> nn.Module:
    """Load a checkpoint strictly into ``model`` (in place; returns it).

    LocalVim checkpoints store per-direction weights by slot k (position in the layer's list), so the
    model must be built with the direction lists the checkpoint was trained with.
    """
    state = read_state_dict(path_or_state)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def _mixers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LocalVimMixer, SS2D))]


def _alphas_from_state(model: nn.Module, state: dict) -> list[torch.Tensor]:
    keys = alpha_state_keys(model)
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(f"supernet: no alpha for {_shorten(missing)} in the supernet state; pass directions=")
    return [state[k] for k in keys]


_VIM_SLOT = re.compile(r"^(A_log|D|conv1d|x_proj|dt_proj)_(\d+)(\..+)?$")
_SS2D_STACKED = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def _inherit(supernet_state: dict, key: str, mixer: nn.Module, suffix: str, mixer_name: str, candidates):
    """The supernet tensor for derived key ``key`` (suffix within ``mixer``), or None if not per-direction."""
    slots = [candidates.index(d) for d in mixer.directions]
    if isinstance(mixer, LocalVimMixer):
        match = _VIM_SLOT.match(suffix)
        if match is None:
            return None
        base, k, rest = match.group(1), int(match.group(2)), match.group(3) or ""
        return supernet_state.get(f"{mixer_name}.{base}_{slots[k]}{rest}")
    if suffix not in _SS2D_STACKED:
        return None
    full = supernet_state.get(f"{mixer_name}.{suffix}")
    if full is None:
        return None
    if suffix in ("A_logs", "Ds"):  # direction-major rows (K * Di, ...)
        return full.view(len(candidates), mixer.d_inner, *full.shape[1:])[slots].flatten(0, 1)
    return full[slots]


def derived_from_supernet(supernet_or_state, derived=None, directions=None, candidates=DIRECTIONS,
                          **overrides) -> nn.Module:
    """A derived model filled with the supernet's weights for the chosen directions (for fine-tuning).

    supernet_or_state: a search model, its state_dict, or a checkpoint path.
    derived: a registered model name, a derived model, or None (the supernet's own architecture with
    the chosen directions; needs a supernet module). Widths must match the supernet's.
    directions: per-layer lists; default: ``derive_directions`` of the supernet's alphas.
    overrides: extra create_model options when ``derived`` is a name (img_size, num_classes and scattn
    default to the supernet's when it is a module).
    candidates: the supernet's candidate scans in alpha order (a supernet module knows its own).
    Per-direction weights move from the supernet's slot ``candidates.index(d)`` to the position of d in the list.
    """
    supernet = supernet_or_state if isinstance(supernet_or_state, nn.Module) else None
    state = supernet.state_dict() if supernet is not None else read_state_dict(supernet_or_state)
    if supernet is not None:
        candidates = search_candidates(supernet)
    candidates = tuple(candidates)
    missing = sorted({d for layer in directions or [] for d in layer} - set(candidates))
    if missing:
        raise UserError(f"directions: {', '.join(missing)} are not candidates of the supernet "
                        f"({', '.join(candidates)}); its weights hold none for them")
    if supernet is not None and directions is None:
        directions = derive_directions(supernet)
    if isinstance(derived, nn.Module):
        model = derived
        if directions is not None and [list(d) for d in directions] != model.directions:
            raise UserError(f"directions: the given derived model runs {model.directions}, not the {directions} asked for")
    elif derived is None:
        if supernet is None or not isinstance(supernet, (LocalVim, LocalVMamba)):
            raise UserError("derived: name a derived model when the supernet is given as a state_dict or path")
        config = {**supernet.config, **overrides, "directions": directions, "candidates": None}
        model = type(supernet)(**config, model_name=f"{supernet.model_name}_derived")
    else:
        if supernet is not None:
            for key in ("img_size", "num_classes", "scattn"):
                overrides.setdefault(key, supernet.config[key])
        if directions is None:
            probe = create_model(derived, **overrides)
            directions = derive_directions(_alphas_from_state(probe, state), candidates=candidates)
        model = create_model(derived, directions=directions, **overrides)
    new_state = {}
    mixers = _mixers(model)
    for key, value in model.state_dict().items():
        source = state.get(key)
        for mixer_name, mixer in mixers:
            if key.startswith(mixer_name + "."):
                inherited = _inherit(state, key, mixer, key[len(mixer_name) + 1:], mixer_name, candidates)
                source = inherited if inherited is not None else source
                break
        if source is None or source.shape != value.shape:
            got = "missing" if source is None else f"shape {tuple(source.shape)}"
            raise UserError(f"supernet: cannot fill {key} {tuple(value.shape)} of {model.model_name} from the "
                             f"supernet ({got}); derive a model of the supernet's widths (derived=None)")
        new_state[key] = source
    model.load_state_dict(new_state, strict=True)
    return model
