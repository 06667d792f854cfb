"""``search.py --baseline fixed|random|published|tpe``: architectures found without the supernet.

- ``fixed``: every layer h, h_flip, v, v_flip (what VMamba scans).
- ``random``: each layer k of the 8 directions drawn without replacement (seed ``tune.baseline.seed``, else the
  config's seed).
- ``published``: LocalMamba's searched lists for the derived model (``nas.models.published_directions``); an
  error when the model has none or a different number of layers.
- ``tpe``: a black-box Optuna TPE study over per-layer direction sets: each layer one categorical over the
  C(8, k) sets (70 for k = 4); each trial trains that derived model from scratch for ``tune.baseline.tpe_epochs``
  epochs with the comparison's retraining recipe (no warm-up: a trial is too short for one) on the training
  images minus the selection split, and its value is top-1 on the selection split (nas.tune.selection). Its
  budget is ``tune.baseline.tpe_trials`` trials, by default ``train.epochs // tpe_epochs``: as many training
  epochs as one supernet search of the config. No pruner: every trial spends its whole budget.

Everything goes under ``RUN/baselines/KIND/``: ``arch.yaml`` (the arch.yaml format of ``nas.derive.export``, from
its builder, ``probs`` = 1/k on the kept directions, plus a ``baseline`` key) and ``search_config.yaml`` (the
search config, so that ``derive.py RUN/baselines/KIND --retrain`` retrains it like a searched one); the TPE study adds ``study.db``,
``trial_NNNN/`` (each trial's arch.yaml and training run), ``best.yaml`` and ``figures/``.
"""
from __future__ import annotations

import copy
import itertools
import os
import random
from typing import NamedTuple

import optuna

from nas import config as cfglib
from nas.derive.arch_file import BASELINE_CONFIG
from nas.derive.export import arch_model_args, build_arch, derived_model_name, write_arch
from nas.derive.retrain import retrain_config, run_retrain
from nas.models import arch_parameters, check_directions, create_model, published_directions, search_candidates
from nas.models.arch import published_names
from nas.models.search_space import AUTO, fixed_counts
from nas.search.run import supernet_args
from nas.tune.report import write_best
from nas.tune.selection import selection_data
from nas.tune.space import TuneError, resolve_tune
from nas.tune.storage import open_storage
from nas.tune.study import (check_run_folder, make_sampler, open_study, optimize_until, pruning_callback,
                            quiet_optuna, removed_unless_opened, report_logged, setup_fingerprint, start_trial,
                            stop_means_retry, study_name_of)

BASELINES = ("fixed", "random", "published", "tpe")
FIXED = ("h", "h_flip", "v", "v_flip")


class SearchLayout(NamedTuple):
    """What a search config fixes for every architecture that stands in for its search."""

    derived: str              # the derived model
    model_args: dict          # its architecture arguments
    layers: int               # searched layers
    k: int | list             # directions per layer: one count, or one per layer
    candidates: tuple         # the scans each layer chooses from, in alpha order

    @property
    def counts(self) -> list[int]:
        return fixed_counts(self.k, self.layers, len(self.candidates))


def canonical(layer, candidates) -> list[str]:
    """A layer's directions in candidate order (as derive.py writes them)."""
    return [d for d in candidates if d in layer]


def search_layout(cfg: dict) -> SearchLayout:
    k = cfg["strategy"]["k"]
    if k == AUTO:
        raise TuneError("strategy.k: auto takes its counts from a search's alphas; a baseline, chosen without them, "
                        "needs k as an int or one int per layer")
    supernet = create_model(cfg["model"], img_size=cfg["img_size"], **supernet_args(cfg))
    return SearchLayout(derived_model_name(cfg["model"]), arch_model_args(cfg, k), len(arch_parameters(supernet)), k,
                        search_candidates(supernet))


def baseline_arch(cfg: dict, directions: list, source: str, baseline: str, layout=None) -> dict:
    """An arch.yaml dict for given per-layer lists (probs 1/k on the kept ones), checked against the derived model."""
    layout = layout or search_layout(cfg)
    derived, model_args, _, k, candidates = layout
    directions = [canonical(layer, candidates) for layer in directions]
    probe = create_model(derived, directions=directions, img_size=cfg["img_size"], **model_args)
    check_directions(directions, len(probe.directions), k, derived)
    probs = [[round(1.0 / n, 6) if d in layer else 0.0 for d in candidates]
             for layer, n in zip(directions, layout.counts)]
    return build_arch(cfg, cfg["model"], k, directions, probs, source, baseline=baseline)


def baseline_directions(kind: str, cfg: dict, seed: int, layout: SearchLayout) -> list[list[str]]:
    derived, _, layers, k, candidates = layout
    if kind == "fixed":
        if k != len(FIXED):
            raise TuneError(f"--baseline fixed: the fixed set is {', '.join(FIXED)} (4 directions) "
                            f"but strategy.k is {k}")
        if not set(FIXED) <= set(candidates):
            raise TuneError(f"--baseline fixed: the fixed set {', '.join(FIXED)} is not among the search space's "
                            f"candidates ({', '.join(candidates)})")
        return [list(FIXED) for _ in range(layers)]
    if kind == "random":
        rng = random.Random(seed)
        return [canonical(rng.sample(candidates, n), candidates) for n in layout.counts]
    if derived not in published_names():
        raise TuneError(f"--baseline published: LocalMamba published no directions for {derived} "
                        f"(it did for {', '.join(published_names())})")
    lists = published_directions(derived)
    if len(lists) != layers or [len(layer) for layer in lists] != layout.counts:
        raise TuneError(f"--baseline published: the published {derived} lists have {len(lists)} layers of "
                        f"{len(lists[0])}; this search space has {layers} layers of {k}")
    outside = sorted({d for layer in lists for d in layer} - set(candidates))
    if outside:
        raise TuneError(f"--baseline published: the published lists use {', '.join(outside)}, which are not among "
                        f"the search space's candidates ({', '.join(candidates)})")
    return [canonical(layer, candidates) for layer in lists]


def write_baseline(kind: str, cfg: dict, out: str) -> tuple[dict, str]:
    """fixed / random / published: write RUN/baselines/KIND/arch.yaml; returns (arch, path)."""
    tune = resolve_tune(cfg, need_params=False)
    seed = tune["baseline"]["seed"] if tune["baseline"]["seed"] is not None else cfg["seed"]
    folder = os.path.join(out, "baselines", kind)
    layout = search_layout(cfg)
    arch = baseline_arch(cfg, baseline_directions(kind, cfg, seed, layout), folder, kind, layout)
    if kind == "random":
        arch["seed"] = seed
    return arch, write_baseline_folder(arch, cfg, folder)


def write_baseline_folder(arch: dict, cfg: dict, folder: str) -> str:
    """FOLDER/arch.yaml and, beside it, the search config it stands in for, so that ``derive.py FOLDER --retrain``
    retrains it as it retrains a searched architecture. Returns the arch.yaml path."""
    os.makedirs(folder, exist_ok=True)
    cfglib.save(cfg, os.path.join(folder, BASELINE_CONFIG))
    path = os.path.join(folder, "arch.yaml")
    write_arch(arch, path)
    return path


def retrain_overrides(tune: dict, epochs: int | None = None, warmup_epochs: int | None = None) -> dict:
    """The comparison's retraining recipe (tune.compare.retrain), optionally with other epochs."""
    recipe = copy.deepcopy(tune["compare"]["retrain"])
    train = recipe.setdefault("train", {})
    if epochs is not None:
        train["epochs"] = epochs
    if warmup_epochs is not None:
        train["warmup_epochs"] = warmup_epochs
    return recipe


def tpe_budget(cfg: dict, tune: dict) -> int:
    trials = tune["baseline"]["tpe_trials"]
    return trials if trials is not None else max(1, cfg["train"]["epochs"] // tune["baseline"]["tpe_epochs"])


class DirectionObjective:
    """A TPE trial: pick k directions per layer, train that network briefly, score it on the selection split."""

    def __init__(self, cfg: dict, tune: dict, root: str, data_cfg: dict | None, seed: int):
        self.cfg, self.tune, self.root, self.seed = cfg, tune, root, seed
        self.search_cfg = dict(cfg, data=data_cfg) if data_cfg is not None else cfg
        self.layout = search_layout(cfg)
        self.layers = self.layout.layers
        self.choices = [[",".join(c) for c in itertools.combinations(self.layout.candidates, n)]
                        for n in self.layout.counts]  # per layer: its k of the candidates

    def __call__(self, trial: optuna.Trial) -> float:
        run_dir = start_trial(trial, self.root, self.tune, self.seed)
        directions = [trial.suggest_categorical(f"layer{i:02d}", choices).split(",")
                      for i, choices in enumerate(self.choices)]
        arch = baseline_arch(self.cfg, directions, run_dir, "tpe", self.layout)
        os.makedirs(run_dir, exist_ok=True)
        arch_path = os.path.join(run_dir, "arch.yaml")
        write_arch(arch, arch_path)
        overrides = retrain_overrides(self.tune, self.tune["baseline"]["tpe_epochs"], 0)
        cfg = retrain_config(arch, arch_path, self.search_cfg, overrides, inherit=False)
        with stop_means_retry(trial):
            record = run_retrain(cfg, run_dir, on_epoch=pruning_callback(trial))
        report_logged(trial, run_dir)  # the per-epoch values, in case the retraining did not call on_epoch
        trial.set_user_attr("directions", arch["directions"])
        return record["val_top1"]


def run_tpe(cfg: dict, out: str, storage: str | None = None, study_name: str | None = None) -> tuple[dict, str]:
    """The TPE baseline's study in RUN/baselines/tpe; returns (best.yaml content, path of the best arch.yaml)."""
    quiet_optuna()
    tune = resolve_tune(cfg, need_params=False)
    check_run_folder(out)
    root = os.path.join(out, "baselines", "tpe")
    seed = tune["sampler"]["seed"] if tune["sampler"]["seed"] is not None else cfg["seed"]
    name = study_name or f"{study_name_of(out)}_tpe"
    with removed_unless_opened(out):
        os.makedirs(root, exist_ok=True)
        data_cfg = selection_data(cfg, tune["selection_fraction"], out)
        store, where = open_storage(storage, root, tune["heartbeat"])
        objective = DirectionObjective(cfg, tune, root, data_cfg, seed)
        fingerprint = {"kind": "tpe", **setup_fingerprint(cfg), "layers": objective.layers,
                       "k": objective.layout.k, "tpe_epochs": tune["baseline"]["tpe_epochs"],
                       "recipe": tune["compare"]["retrain"], "selection_fraction": tune["selection_fraction"]}
        study = open_study(name, store, make_sampler(tune, seed), optuna.pruners.NopPruner(), fingerprint)
    optimize_until(study, objective, tpe_budget(cfg, tune), tune["heartbeat"]["max_retry"])
    metric = ("top-1 (%) on the selection split after training the derived model for "
              f"{tune['baseline']['tpe_epochs']} epoch(s)")
    best = write_best(study, where, root, metric)
    if best["best_trial"] is None:
        raise TuneError(f"--baseline tpe: no trial of {name!r} completed; see {root}")
    arch = cfglib.load_yaml(os.path.join(best["run_dir"], "arch.yaml"))
    arch["source"] = os.path.abspath(best["run_dir"])
    return best, write_baseline_folder(arch, cfg, root)


def run_baseline(kind: str, cfg: dict, out: str, storage: str | None = None, study_name: str | None = None) -> str:
    """Write the baseline's arch.yaml (running the TPE study for tpe); returns its path."""
    if kind == "tpe":
        return run_tpe(cfg, out, storage, study_name)[1]
    check_run_folder(out)
    return write_baseline(kind, cfg, out)[1]
