"""Retrain the derived network of a search run, from scratch or from the supernet's weights (``--inherit``).

The loop is the search's (``nas.engine.loop.fit``); this module adds the recipe: mixup/cutmix with
label smoothing, an optional EMA of the weights, and no alpha. The published recipe is the default
(AdamW lr 1e-3, wd 0.04 with norms, biases and position embeddings exempt, 20 warm-up epochs, cosine to
1e-6, label smoothing 0.1, drop-path 0.1, mixup 0.2, cutmix 1.0); a search space's ``retrain:`` section
and the command line override it (the demo's retraining is shorter and has no mixup).
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch

from nas import config as cfglib
from nas.data import DATA_DEFAULTS, build_datasets, build_loader, resolve_data_config
from nas.data.errors import DataError
from nas.derive.arch_file import BASELINE_CONFIG, baseline_config
from nas.derive.export import DeriveError, candidates_of
from nas.engine import checkpoint
from nas.errors import UserError
from nas.engine.augment import MixupCutmix, ModelEma, soft_cross_entropy
from nas.engine.session import (check_out_folder, data_parallel, find_resume, open_run, resume_changes,
                                run_in_process_group)
from nas.engine.loop import TRAIN_DEFAULTS, Task, fit
from nas.engine.optim import adamw, weight_groups
from nas.engine.settings import LOG_CHECKS, LOG_DEFAULTS, check_train
from nas.models import create_model, derived_from_supernet
from nas.models.arch import read_arch_file

RETRAIN_DEFAULTS = {
    "model": None,               # the derived model (from arch.yaml)
    "arch": None,                # path of arch.yaml
    "directions": None,          # the directions retrained, per layer (arch.yaml's when the retraining began)
    "search_epoch": None,        # the search epoch they were derived at (None: a baseline or a hand-written file)
    "source": None,              # the search run
    "inherit": False,            # start from the supernet's weights of the kept directions
    "model_args": {},            # create_model options (free-form); the recipe's drop_path_rate is 0.1
    "img_size": 224,
    "seed": 0,
    "data": dict(DATA_DEFAULTS),
    "train": {**TRAIN_DEFAULTS, "epochs": 300, "mixup": 0.2, "cutmix": 1.0, "mixup_prob": 1.0,
              "mixup_switch_prob": 0.5, "ema_decay": None},
    "log": dict(LOG_DEFAULTS),
}
RETRAIN_CHECKS = {
    "model": cfglib.TEXT, "arch": cfglib.TEXT, "source": cfglib.TEXT, "inherit": cfglib.BOOLEAN,
    "model_args": cfglib.MAPPING, "img_size": cfglib.integer(1), "seed": cfglib.integer(0), **LOG_CHECKS,
}
RECIPE_CHECKS = {  # the train: keys the retraining adds to the loop's
    "mixup": cfglib.number(0), "cutmix": cfglib.number(0), "mixup_prob": cfglib.number(0, 1),
    "mixup_switch_prob": cfglib.number(0, 1), "ema_decay": cfglib.number(0, 1, True, True).or_none("no EMA"),
}


def check_retrain_config(cfg: dict) -> None:
    """Every setting of a retraining, type and range, before anything is built or written (one-line UserError)."""
    cfglib.validate(cfg, RETRAIN_CHECKS)
    check_train(cfg["train"], RECIPE_CHECKS)
    resolve_data_config(cfg["data"])


class RetrainTask(Task):
    def __init__(self, model, num_classes: int, train: dict):
        self.mix = MixupCutmix(num_classes, train["mixup"], train["cutmix"], train["mixup_prob"],
                               train["mixup_switch_prob"], train["label_smoothing"])
        self.ema = ModelEma(model, train["ema_decay"]) if train["ema_decay"] else None
        self.model = model

    def loss(self, model, images, labels):
        images, targets = self.mix(images, labels)
        logits = model(images)
        return soft_cross_entropy(logits, targets), logits

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def eval_model(self, model):
        return self.ema.module if self.ema is not None else model

    def state_dict(self) -> dict:
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])


def retrain_config(arch: dict, arch_path: str, search_cfg: dict, overrides: dict, inherit: bool) -> dict:
    """Defaults, then what the search run fixes (data, image size, seed, architecture arguments), then the
    search space's ``retrain:`` section, then the command line."""
    data = {**(search_cfg.get("data") or {}), "heldout_fraction": None, "heldout_path": None}
    base = {"model": arch["model"], "arch": os.path.abspath(arch_path), "directions": arch["directions"],
            "search_epoch": arch.get("epoch"), "source": arch["source"], "inherit": inherit,
            "model_args": {"drop_path_rate": 0.1, **arch["model_args"]},
            "img_size": search_cfg.get("img_size", RETRAIN_DEFAULTS["img_size"]),
            "seed": search_cfg.get("seed", 0), "data": data}
    cfg = cfglib.merge(RETRAIN_DEFAULTS, base, "arch")
    cfg = cfglib.merge(cfg, search_cfg.get("retrain") or {}, "search config's retrain section", RETRAIN_DEFAULTS)
    return cfglib.merge(cfg, overrides, "command line", RETRAIN_DEFAULTS)


@contextlib.contextmanager
def search_data_named(run_dir: str):
    """``with search_data_named(RUN):`` a data error of the retraining names the data settings it kept from the
    search's config (``--data`` changes only the path; data.images_per_class 12 may not fit a new folder)."""
    try:
        yield
    except DataError as exc:
        raise DataError(f"{exc}{_search_data_note(str(exc), run_dir)}") from None


def _search_data_note(message: str, run_dir: str) -> str:
    search_cfg = baseline_config(run_dir)
    path = os.path.join(run_dir, BASELINE_CONFIG if search_cfg is not None else "config.yaml")
    if search_cfg is None:
        if not os.path.isfile(path):
            return ""
        search_cfg = cfglib.load_yaml(path, "run")
    named = [f"data.{key} {value}" for key, value in (search_cfg.get("data") or {}).items()
             if key != "path" and value is not None and value != DATA_DEFAULTS.get(key) and f"data.{key}" in message]
    if not named:
        return ""
    return (f" ({', '.join(named)}: the search's setting, from {path}, which the retraining keeps; "
            f"override it on the command line, e.g. --{named[0].split()[0]} null)")


def retrained_directions(cfg: dict) -> list:
    """The directions a retraining trains: its config's (retrainings begun before it held them: arch.yaml's)."""
    return cfg["directions"] if cfg.get("directions") is not None else read_arch_file(cfg["arch"])


def build_model(cfg: dict, num_classes: int):
    args = dict(cfg["model_args"], img_size=cfg["img_size"], num_classes=num_classes)
    directions = retrained_directions(cfg)
    if not cfg["inherit"]:
        return create_model(cfg["model"], directions=directions, **args)
    last = os.path.join(cfg["source"], "last.pt")
    if not os.path.isfile(last):
        raise DeriveError(f"--inherit: the search run {cfg['source']!r} holds no last.pt to inherit from")
    state = checkpoint.load(last)["model"]
    head = state.get("head.weight")  # both families classify with a Linear named head
    if head is not None and head.shape[0] != num_classes:
        raise DeriveError(f"--inherit: the supernet in {cfg['source']} was trained on {head.shape[0]} classes but the "
                          f"retraining data has {num_classes}; retrain from scratch (without --inherit) or on data "
                          f"with the search's classes")
    candidates = candidates_of(cfglib.load_yaml(cfg["arch"], "arch"))  # the supernet's alpha order
    try:
        return derived_from_supernet(state, cfg["model"], directions, candidates, **args)
    except UserError as exc:
        raise DeriveError(f"--inherit: {_unfit_reason(cfg) or exc}") from None


def _unfit_reason(cfg: dict) -> str | None:
    """Why the supernet's weights do not fit the retrained model, when a setting the retraining changed is why."""
    searched = cfglib.load_yaml(os.path.join(cfg["source"], "config.yaml"), "run")
    ours = {"img_size": cfg["img_size"], **{f"model_args.{k}": v for k, v in cfg["model_args"].items()}}
    theirs = {"img_size": searched.get("img_size"),
              **{f"model_args.{k}": v for k, v in (searched.get("model_args") or {}).items()}}
    changed = [f"{k} {theirs[k]} in the search, {v} here" for k, v in ours.items()
               if k in theirs and k not in ("model_args.drop_path_rate", "model_args.scans_per_layer")
               and theirs[k] is not None and theirs[k] != v]
    if not changed:
        return None
    return (f"the supernet's weights ({cfg['source']}) do not fit a model with other sizes than the search's "
            f"({'; '.join(changed)}); retrain with the search's settings, or from scratch without --inherit")


def run_retrain(cfg: dict, out: str, on_epoch=None) -> dict:
    """Run (or resume) a retraining; returns the last epoch's log record."""
    check_retrain_config(cfg)
    check_out_folder(out)
    return run_in_process_group(cfg["train"]["device"], _run, cfg, out, on_epoch)


def _run(env, cfg: dict, out: str, on_epoch=None) -> dict:
    resume_changes(find_resume(out) if os.path.isdir(out) else None, cfg, out)
    torch.manual_seed(cfg["seed"])
    train = cfg["train"]
    # mistakes in the data or the model settings surface here, before anything is written
    data = build_datasets(cfg["data"], cfg["img_size"], cfg["seed"])
    model = build_model(cfg, data.num_classes)
    train_loader = build_loader(data.train, train["batch_size"], True, train["workers"], cfg["seed"])
    val_loader = build_loader(data.val, train["batch_size"], False, train["workers"], cfg["seed"])
    with open_run(out, env, cfg, data) as run:
        train_model = data_parallel(model, env, compile=train.get("compile", False))
        optimizer = adamw(weight_groups(model, train["lr"], train["weight_decay"]))
        how = "from the supernet's weights" if cfg["inherit"] else "from scratch"
        run.logger.info(f"retrain {cfg['model']} {how} on {data.summary()}; writing to {out}")
        task = RetrainTask(model, data.num_classes, train)
        return fit(task, model, train_model, optimizer, train_loader, val_loader, train, env, run.logger, out,
                   run.resume, on_epoch=on_epoch, extra={"config": copy.deepcopy(cfg), "model_name": cfg["model"]},
                   stop=run.stop)
