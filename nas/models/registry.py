"""Named model variants in the timm manner: ``create_model(name, directions=None, **overrides)``.

Each family module registers its variants with ``register_model``. A variant is either a search model
(supernet: every layer runs all 8 directions) or a derived model (each layer runs its own list of
directions; defaults to the published list).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from nas.errors import UserError
from nas.models.arch import published_directions, resolve_directions
from nas.models.settings import check_model_args


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type
    defaults: dict = field(default_factory=dict)
    default_directions: Callable[[], list] | None = None  # None: a search model

    @property
    def search(self) -> bool:
        return self.default_directions is None


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register_model(name: str, cls: type, *, directions=None, aliases=(), **defaults) -> None:
    """Register a variant. directions: None for a search model; a published-list name or a
    zero-argument callable returning the per-layer lists for a derived model."""
    if isinstance(directions, str):
        published = directions
        directions = lambda: published_directions(published)  # noqa: E731
    _MODELS[name] = ModelSpec(name, cls, dict(defaults), directions)
    for alias in aliases:
        _ALIASES[alias] = name


def list_models(pattern: str = "*", include_aliases: bool = False) -> list[str]:
    """Registered model names (sorted), optionally filtered by a glob pattern such as ``"*_search"``."""
    names = list(_MODELS) + (list(_ALIASES) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def model_spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or (name not in _MODELS and name not in _ALIASES):
        raise UserError(f"model: unknown model name {name!r}; expected one of {', '.join(list_models())} "
                        f"(aliases: {', '.join(sorted(_ALIASES))})")
    return _MODELS[_ALIASES.get(name, name)]


def is_search_model(name: str) -> bool:
    return model_spec(name).search


def create_model(name: str, directions=None, *, features_only: bool = False, out_indices=None, **overrides):
    """Build a registered model.

    directions: derived models only; a list of per-layer direction lists, the path of an arch YAML file
    (``{model: ..., directions: [[...], ...]}``) or a published-list name. Defaults to the variant's list.
    overrides: any constructor argument of the family (img_size, num_classes, drop_path_rate,
    scattn ("channel" | "full"), backend, ...).
    features_only: the backbone (``nas.models.backbone``): forward gives the list of NCHW feature maps of
    ``out_indices``, described by ``feature_info``; from an arch file it takes the file's model_args as defaults.
    """
    spec = model_spec(name)
    if features_only:
        from nas.models.backbone import arch_model_args, backbone_class  # backbone.py builds on this module
        overrides = {**arch_model_args(directions), **overrides}
    elif out_indices is not None:
        raise UserError(f"out_indices: only a backbone takes them; pass features_only=True with "
                        f"out_indices={out_indices!r}")
    check_model_args(spec, overrides)
    config = {**spec.defaults, **overrides}
    if spec.search:
        if directions is not None:
            raise UserError(f"directions: {spec.name} is a search model that runs all 8 directions in every layer; "
                            f"pass directions= to a derived model instead")
        config["directions"] = None
    else:
        config["directions"] = resolve_directions(spec.default_directions() if directions is None else directions)
    if features_only:
        config["out_indices"] = out_indices
    model = (backbone_class(spec.cls) if features_only else spec.cls)(**config, model_name=spec.name)
    return model
