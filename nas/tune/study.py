"""``search.py --tune N``: an Optuna study whose trials are searches.

Each trial is the base config plus the values it samples from ``tune.params``, run by ``run_search`` in its own
folder ``RUN/trial_NNNN/`` (a full search run folder: config, checkpoints, alphas, logs). What a trial reports:
- every epoch, the supernet's top-1 as the search logs it (``val_top1``); with the selection split (the default,
  see ``nas.tune.selection``) that is top-1 on the held-out selection images, for every strategy (the bilevel
  strategy's alpha data is split off the remaining training images and never replaces val). The pruner
  (``tune.pruner``: median or Hyperband, steps = epochs) compares these.
- at the end, its value: the last epoch's ``val_top1``, so every trial's value is measured on the same images.
A search whose loss stops being finite is pruned (user attribute ``stopped``).

Several processes given the same ``--out`` (or ``--storage`` and ``--study``) share the study: each runs
trials until the study holds N finished (complete or pruned) trials, counting trials others are running, so the
study ends with N (a killed trial is re-queued, see ``nas.tune.storage``). Then it writes ``best.yaml`` and the
figures (``nas.tune.report``); the last worker to finish writes the final ones.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

import optuna
from optuna.trial import TrialState

from nas.engine.loop import NonFiniteLoss
from nas.engine.preempt import Preempted
from nas.engine.run_log import epoch_records
from nas.search.run import run_search
from nas.tune.report import write_best
from nas.tune.selection import selection_data
from nas.tune.space import TuneError, apply_params, check_trial_config, resolve_tune, suggest
from nas.tune.storage import STOPPED, fail_dead_local_trials, open_storage, requeue_stopped_trials, worker_attrs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# what a stop signal raises in a trial: a stop after a checkpoint, or a second signal (stop at once)
STOPPED_BY_SIGNAL = (Preempted, KeyboardInterrupt)


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and its notes on experimental features would bury the run's own log; set
    when a study starts, not on import, so that importing nas.tune leaves a user's Optuna settings alone."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(tune: dict, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune["sampler"]["n_startup_trials"],
                                      constant_liar=True)


def make_pruner(tune: dict, epochs: int) -> optuna.pruners.BasePruner:
    p = tune["pruner"]
    if p["name"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p["n_startup_trials"], n_warmup_steps=p["n_warmup_steps"])
    if p["name"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p["min_resource"]), max_resource=epochs,
                                              reduction_factor=p["reduction_factor"])
    return optuna.pruners.NopPruner()


def check_run_folder(out: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TuneError("--tune/--baseline/--compare run one process per worker; instead of torchrun, start several "
                        "workers on the same --out (or --storage and --study), one per GPU (CUDA_VISIBLE_DEVICES)")
    if os.path.isfile(os.path.join(out, "last.pt")):
        raise TuneError(f"--out: {out!r} holds a search run (last.pt); give the study a folder of its own")


@contextlib.contextmanager
def removed_unless_opened(folder: str):
    """``with removed_unless_opened(out):`` create ``out`` for a study; if this command created it and the block
    fails (a storage that cannot be opened, another setup's study), remove it again: a command that fails
    before its study is open leaves no folder behind."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def open_study(name: str, storage, sampler, pruner, fingerprint: dict) -> optuna.Study:
    """Create the study, or join it when it exists; refuse one made for another space or config."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    mine = json.loads(json.dumps(fingerprint))  # as stored: tuples become lists
    theirs = study.user_attrs.get("fingerprint")
    if theirs is None:
        study.set_user_attr("fingerprint", mine)
    elif theirs != mine:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise TuneError(f"--study {name!r}: that study was made for another setup (it differs in {', '.join(diff)}); "
                        f"use another --out or --study")
    return study


def setup_fingerprint(cfg: dict) -> dict:
    """What workers of one study must agree on. Data paths may differ between machines; subsets may not."""
    data = {k: v for k, v in cfg["data"].items() if k not in ("path", "val_path", "heldout_path")}
    candidates = (cfg.get("search") or {}).get("candidates")
    return {"model": cfg["model"], "model_args": cfg["model_args"], "img_size": cfg["img_size"], "data": data,
            "seed": cfg["seed"], **({"candidates": candidates} if candidates is not None else {})}


def optimize_until(study: optuna.Study, objective, n_trials: int, max_retry: int | None) -> None:
    """Run trials in this process until the study holds n_trials finished ones (others' running ones count).
    A trial stopped by a signal (Ctrl-C, a scheduler's SIGTERM) is queued again and the stop ends this worker;
    the next worker to begin a trial continues it."""
    while True:
        fail_dead_local_trials(study, max_retry)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if done + running >= n_trials:
            return
        try:
            study.optimize(objective, n_trials=1, gc_after_trial=True)
        except STOPPED_BY_SIGNAL:
            requeue_stopped_trials(study)
            raise
        finally:
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # see stop_means_retry


@contextlib.contextmanager
def stop_means_retry(trial: optuna.Trial):
    """``with stop_means_retry(trial):`` around a trial's run: a stop signal (Ctrl-C, a scheduler's SIGTERM),
    after which the run has written its checkpoint, marks the trial to be queued again (``optimize_until``)
    instead of being a failure that Optuna would log with a traceback."""
    try:
        yield
    except STOPPED_BY_SIGNAL:
        trial.set_user_attr(STOPPED, True)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        raise


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def trial_folder(trial: optuna.Trial, root: str) -> str:
    """RUN/trial_NNNN; a retried trial continues the folder of the trial it retries."""
    original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen(trial))
    run_dir = os.path.join(root, f"trial_{trial.number if original is None else original:04d}")
    if original is None and os.path.exists(run_dir):
        raise TuneError(f"{run_dir} exists but the study has no record of it (was the study's storage deleted?); "
                        f"move the old trial folders away or use another --out")
    return run_dir


def start_trial(trial: optuna.Trial, root: str, tune: dict, seed: int) -> str:
    """Seed the sampler by trial number (workers never repeat each other's draws), note who runs the trial."""
    trial.study.sampler = make_sampler(tune, seed + trial.number)
    run_dir = trial_folder(trial, root)
    for key, value in {**worker_attrs(), "run_dir": os.path.abspath(run_dir)}.items():
        trial.set_user_attr(key, value)
    return run_dir


def report_logged(trial: optuna.Trial, run_dir: str, metric: str = "val_top1") -> None:
    """A retried trial resumes its folder: report the epochs it logged before it was killed."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    records = epoch_records(path)
    for epoch, record in sorted(records.items()):
        if epoch not in frozen(trial).intermediate_values:
            trial.report(record[metric], epoch)
    if records and trial.should_prune():
        raise optuna.TrialPruned(f"pruned after epoch {max(records)} (logged before a restart)")


def pruning_callback(trial: optuna.Trial, metric: str = "val_top1"):
    """The run's on_epoch: report the epoch's metric, stop the run when the pruner says so."""
    def on_epoch(record: dict) -> None:
        trial.report(record[metric], record["epoch"])
        trial.set_user_attr("epochs", record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({metric} {record[metric]:.2f})")
    return on_epoch


class SearchObjective:
    def __init__(self, cfg: dict, tune: dict, root: str, data_cfg: dict | None, seed: int):
        self.cfg, self.tune, self.root, self.data_cfg, self.seed = cfg, tune, root, data_cfg, seed

    def trial_config(self, values: dict) -> dict:
        cfg = apply_params(self.cfg, values)
        cfg["tune"] = {}
        if self.data_cfg is not None:
            cfg["data"] = dict(self.data_cfg, heldout_fraction=cfg["data"]["heldout_fraction"])
        return cfg

    def __call__(self, trial: optuna.Trial) -> float:
        run_dir = start_trial(trial, self.root, self.tune, self.seed)
        values = suggest(trial, self.tune["params"])
        cfg = self.trial_config(values)
        check_trial_config(cfg, f"trial {trial.number}")
        report_logged(trial, run_dir)
        try:
            with stop_means_retry(trial):
                result = run_search(cfg, run_dir, on_epoch=pruning_callback(trial))
        except NonFiniteLoss as exc:
            trial.set_user_attr("stopped", str(exc))
            raise optuna.TrialPruned(f"stopped: {exc}") from None
        trial.set_user_attr("directions", [list(d) for d in result["directions"]])
        return result["record"]["val_top1"]


def study_name_of(out: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(out)))


def run_study(cfg: dict, out: str, n_trials: int, storage: str | None = None, study_name: str | None = None) -> dict:
    """Work on the study of ``out`` until it holds ``n_trials`` finished trials; returns best.yaml's content."""
    if n_trials < 1:
        raise TuneError(f"--tune: expected a number of trials >= 1, got {n_trials}")
    quiet_optuna()
    tune = resolve_tune(cfg)
    check_run_folder(out)
    seed = tune["sampler"]["seed"] if tune["sampler"]["seed"] is not None else cfg["seed"]
    fingerprint = {"kind": "search", **setup_fingerprint(cfg), "epochs": cfg["train"]["epochs"],
                   "params": tune["params"], "selection_fraction": tune["selection_fraction"]}
    name = study_name or study_name_of(out)
    with removed_unless_opened(out):
        data_cfg = selection_data(cfg, tune["selection_fraction"], out)
        store, where = open_storage(storage, out, tune["heartbeat"])
        study = open_study(name, store, make_sampler(tune, seed), make_pruner(tune, cfg["train"]["epochs"]),
                           fingerprint)
    optimize_until(study, SearchObjective(cfg, tune, out, data_cfg, seed), n_trials, tune["heartbeat"]["max_retry"])
    metric = ("supernet top-1 (%) on the selection split (held-out training images)" if data_cfg is not None
              else "supernet val_top1 (%) of the last epoch")
    return write_best(study, where, out, metric)
