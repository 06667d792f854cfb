"""The ``tune:`` section of a search space: what ``search.py --tune`` varies and how its study runs.

    tune:
      params:                          # the tuning search space; keys are search-config keys
        strategy.alpha_lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
        strategy.alpha_warmup_epochs: {type: int, low: 0, high: 2}
        strategy.name: {type: categorical, choices: [joint, bilevel, sampled]}
      pruner: {name: median}           # median | hyperband | none
      selection_fraction: 0.2          # training images held out to score trials (see nas.tune.study)

A parameter is ``{type: float, low, high, log: false, step: null}``, ``{type: int, low, high, log: false,
step: 1}`` or ``{type: categorical, choices: [...]}``. Parameter keys may be dotted (``train.lr``) or nested
(``train: {lr: {...}}``). Every mistake is a ``TuneError``: one line that names the key.
"""
from __future__ import annotations

import copy

from nas import config as cfglib
from nas.errors import UserError
from nas.search.run import SEARCH_DEFAULTS, check_config
from nas.search.strategies import check_strategy

TUNE_DEFAULTS = {
    "params": {},
    # fraction of each class's training images held out (seeded) to score trials: trials train on the rest
    # and report top-1 on it. null or 0: trials report the search's own val top-1 (the val split).
    "selection_fraction": 0.2,
    "sampler": {"seed": None, "n_startup_trials": 4},  # TPE; seed null: the config's seed
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1,  # median
               "min_resource": 1, "reduction_factor": 3},                     # hyperband (max: train.epochs)
    # a worker records a heartbeat every `interval` s; a RUNNING trial silent for `grace_period` s (or whose
    # process is gone, on this host) is marked FAIL and re-queued with the same parameters up to max_retry times
    "heartbeat": {"interval": 60, "grace_period": 180, "max_retry": 1},
    "baseline": {"seed": None,        # --baseline random: seed of the draw (null: the config's seed)
                 "tpe_epochs": 2,     # --baseline tpe: training epochs of each trial's derived model
                 "tpe_trials": None},  # null: train.epochs // tpe_epochs (the search's budget, see compare)
    "compare": {"strategies": ["joint", "sampled"],  # the supernet searches compared
                "retrain": {},        # overrides of the retraining recipe, the same for every candidate
                "seeds": [0]},        # each candidate is retrained once per seed
}
PARAM_TYPES = ("float", "int", "categorical")
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices"}}
_ALL_SPEC_KEYS = set().union(*SPEC_KEYS.values())
PRUNERS = ("median", "hyperband", "none")
FREE_FORM = ("model_args", "retrain")  # free-form sections of the search config: any key below them is allowed


class TuneError(UserError):
    """A mistake in the tune section or the tuning flags: one line, exit code 2."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _param_leaves(node, prefix: str = "") -> dict:
    """Nested or dotted ``params`` -> {"strategy.alpha_lr": spec}. A spec is a dict holding a spec key."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (set(value) & _ALL_SPEC_KEYS):
            out.update(_param_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def _check_key(key: str) -> None:
    valid = cfglib.flatten(SEARCH_DEFAULTS)
    if key.startswith("tune.") or key == "tune" or key == "name":
        raise TuneError(f"tune.params: {key!r} cannot be tuned (the tune section and the run name are fixed)")
    if key in valid and not isinstance(valid[key], dict):
        return
    if any(key.startswith(section + ".") for section in FREE_FORM):
        return
    close = sorted(k for k in valid if k.split(".")[0] == key.split(".")[0])[:8]
    hint = f"; keys of {key.split('.')[0]!r}: {', '.join(close)}" if close else ""
    raise TuneError(f"tune.params: unknown parameter {key!r} (not a key of the search config{hint})")


def _check_spec(key: str, spec) -> dict:
    where = f"tune.params.{key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise TuneError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
    kind = spec["type"]
    if kind not in PARAM_TYPES:
        raise TuneError(f"{where}.type: expected one of {', '.join(PARAM_TYPES)}, got {kind!r}")
    unknown = sorted(set(spec) - SPEC_KEYS[kind])
    if unknown:
        raise TuneError(f"{where}: unknown field(s) {', '.join(unknown)} for type {kind}; "
                        f"expected {', '.join(sorted(SPEC_KEYS[kind]))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
            raise TuneError(f"{where}.choices: Optuna takes only None, bool, int, float and str choices")
        return {"type": kind, "choices": list(choices)}
    number = _is_int if kind == "int" else _is_number
    low, high = spec.get("low"), spec.get("high")
    if not number(low) or not number(high) or not low < high:
        raise TuneError(f"{where}: expected {kind} low < high, got low {low!r}, high {high!r}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise TuneError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise TuneError(f"{where}: a log scale needs low > 0, got {low!r}")
    if step is not None and (not number(step) or step <= 0 or log):
        raise TuneError(f"{where}.step: expected a positive {kind} and no log scale, got {step!r}")
    return {"type": kind, "low": low, "high": high, "log": log, "step": step}


def check_trial_config(cfg: dict, where: str) -> None:
    """What the search checks before training (every setting, against the model and its candidates too),
    for a config with sampled values."""
    try:
        check_config(cfg)
    except UserError as exc:  # a sampled value the search would refuse: say which
        raise TuneError(f"{where}: {exc}") from None


def resolve_tune(cfg: dict, need_params: bool = True) -> dict:
    """The config's tune section over ``TUNE_DEFAULTS``, checked; ``params`` become {dotted key: spec}."""
    raw = copy.deepcopy(cfg.get("tune") or {})
    params = raw.pop("params", {}) or {}
    if not isinstance(params, dict):
        raise TuneError(f"tune.params: expected a mapping of search-config keys to parameters, got {params!r}")
    try:
        tune = cfglib.merge({"tune": {**TUNE_DEFAULTS, "params": {}}}, {"tune": raw} if raw else {},
                            "search config")["tune"]
    except cfglib.ConfigError as exc:
        raise TuneError(str(exc)) from None
    tune["params"] = {}
    for key, spec in _param_leaves(params).items():
        _check_key(key)
        tune["params"][key] = spec = _check_spec(key, spec)
        probes = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in probes:
            check_trial_config(apply_params(cfg, {key: value}), f"tune.params.{key} = {value!r}")
    if need_params and not tune["params"]:
        raise TuneError("tune.params: the search space is empty; list the settings to tune in the config's tune: "
                        "params: section (e.g. strategy.alpha_lr: {type: float, low: 1e-3, high: 0.1, log: true})")
    _check_options(tune)
    return tune


def _check_options(tune: dict) -> None:
    frac = tune["selection_fraction"]
    if frac is not None and (not _is_number(frac) or not 0 <= frac < 1):
        raise TuneError(f"tune.selection_fraction: expected a number in [0, 1) or null, got {frac!r}")
    pruner = tune["pruner"]
    if pruner["name"] not in PRUNERS:
        raise TuneError(f"tune.pruner.name: expected one of {', '.join(PRUNERS)}, got {pruner['name']!r}")
    for key in ("n_startup_trials", "n_warmup_steps", "min_resource"):
        if not _is_int(pruner[key]) or pruner[key] < 0:
            raise TuneError(f"tune.pruner.{key}: expected an int >= 0, got {pruner[key]!r}")
    if not _is_int(pruner["reduction_factor"]) or pruner["reduction_factor"] < 2:
        raise TuneError(f"tune.pruner.reduction_factor: expected an int >= 2, got {pruner['reduction_factor']!r}")
    sampler = tune["sampler"]
    if sampler["seed"] is not None and not _is_int(sampler["seed"]):
        raise TuneError(f"tune.sampler.seed: expected an int or null, got {sampler['seed']!r}")
    if not _is_int(sampler["n_startup_trials"]) or sampler["n_startup_trials"] < 0:
        raise TuneError(f"tune.sampler.n_startup_trials: expected an int >= 0, got {sampler['n_startup_trials']!r}")
    beat = tune["heartbeat"]
    if not _is_int(beat["interval"]) or beat["interval"] < 1:
        raise TuneError(f"tune.heartbeat.interval: expected an int >= 1 (seconds), got {beat['interval']!r}")
    if not _is_int(beat["grace_period"]) or beat["grace_period"] <= beat["interval"]:
        raise TuneError(f"tune.heartbeat.grace_period: expected an int > heartbeat.interval (seconds), "
                        f"got {beat['grace_period']!r}")
    if beat["max_retry"] is not None and (not _is_int(beat["max_retry"]) or beat["max_retry"] < 0):
        raise TuneError(f"tune.heartbeat.max_retry: expected an int >= 0 or null (no limit), got {beat['max_retry']!r}")
    base = tune["baseline"]
    if not _is_int(base["tpe_epochs"]) or base["tpe_epochs"] < 1:
        raise TuneError(f"tune.baseline.tpe_epochs: expected an int >= 1, got {base['tpe_epochs']!r}")
    if base["tpe_trials"] is not None and (not _is_int(base["tpe_trials"]) or base["tpe_trials"] < 1):
        raise TuneError(f"tune.baseline.tpe_trials: expected an int >= 1 or null, got {base['tpe_trials']!r}")
    if base["seed"] is not None and not _is_int(base["seed"]):
        raise TuneError(f"tune.baseline.seed: expected an int or null, got {base['seed']!r}")
    strategies = tune["compare"]["strategies"]
    if not isinstance(strategies, list) or not strategies:
        raise TuneError(f"tune.compare.strategies: expected a non-empty list of strategies, got {strategies!r}")
    for name in strategies:
        try:
            check_strategy({"name": name, "k": 4, "alpha_warmup_epochs": 0})
        except UserError as exc:
            raise TuneError(f"tune.compare.strategies: {exc}") from None
    seeds = tune["compare"]["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) < len(seeds):
        raise TuneError(f"tune.compare.seeds: expected a non-empty list of distinct ints, got {seeds!r}")
    if not isinstance(tune["compare"]["retrain"], dict):
        raise TuneError(f"tune.compare.retrain: expected a mapping of retraining overrides, "
                        f"got {tune['compare']['retrain']!r}")


def apply_params(cfg: dict, values: dict) -> dict:
    """A copy of ``cfg`` with {dotted key: value} set."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def suggest(trial, params: dict) -> dict:
    """Sample every parameter of the space on an Optuna trial: {dotted key: value}."""
    values = {}
    for key, spec in params.items():
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec["step"] or 1, log=spec["log"])
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
    return values
