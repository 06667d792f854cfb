"""``RUN/best.yaml`` (contract) and the study's figures.

best.yaml: ``study_name``, ``storage`` (a database URL for ``optuna.load_study``: by default the run folder's
SQLite file, ``sqlite:////abs/path/RUN/study.db``; or the path of a journal file of a study begun before that was
the default, see ``storage_type``), ``storage_type`` (``rdb`` | ``journal``), ``best_trial`` (its number),
``value``, ``params``, ``run_dir`` (the best trial's run folder) and ``host`` (where that folder is), plus
``metric`` (what the value measures), ``trials`` (counts by state) and ``figures``. Before any trial completes,
the best fields are null. Open the study with ``nas.tune.load_study(RUN)`` (either storage type), or by hand: for
``rdb``, ``optuna.load_study(study_name=..., storage=URL)``; for ``journal``, ``optuna.load_study(study_name=...,
storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(PATH)))``. Browse it with
``optuna-dashboard URL_OR_PATH`` (the ``storage`` value as it stands).

Figures (PNG, ``optuna.visualization.matplotlib``): ``figures/optimization_history.png``,
``figures/param_importances.png`` (from two completed trials on) and ``figures/intermediate_values.png`` (the
per-epoch reports the pruner saw).
"""
from __future__ import annotations

import os
import warnings

import optuna
import yaml
from optuna.trial import TrialState

from nas.atomic import atomic_write
from nas.tune.storage import STOPPED
from nas.viz import save_figure

FIGURES = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
           "intermediate_values": "plot_intermediate_values"}


def draw_figures(study: optuna.Study, folder: str) -> tuple[dict, dict]:
    """({name: PNG path} of the figures drawn, {name: why not} of the others)."""
    from optuna.visualization import matplotlib as optuna_mpl

    os.makedirs(folder, exist_ok=True)
    drawn, skipped = {}, {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name, function in FIGURES.items():
        if name == "param_importances" and len(complete) < 2:
            skipped[name] = "needs two completed trials"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(optuna_mpl, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of a constant parameter
            skipped[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = os.path.join(folder, f"{name}.png")
        save_figure(fig, path)
        drawn[name] = path
    return drawn, skipped


def summarize(study: optuna.Study, where: dict, metric: str) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    # a trial a stop signal ended is no failure: its retry continues it (nas.tune.storage.requeue_stopped_trials)
    counts["stopped"] = sum(t.state == TrialState.FAIL and bool(t.user_attrs.get(STOPPED)) for t in trials)
    counts["fail"] -= counts["stopped"]
    doc = {"study_name": study.study_name, **where, "best_trial": None, "value": None, "params": None,
           "run_dir": None, "host": None, "metric": metric, "trials": counts}
    if counts["complete"]:
        best = study.best_trial
        doc.update(best_trial=best.number, value=best.value, params=dict(best.params),
                   run_dir=best.user_attrs.get("run_dir"), host=best.user_attrs.get("host"))
        if "directions" in best.user_attrs:
            doc["directions"] = best.user_attrs["directions"]
    return doc


def _header(doc: dict) -> str:
    if doc["storage_type"] == "journal":
        how = (f"optuna.load_study(study_name={doc['study_name']!r}, storage=optuna.storages.JournalStorage("
               f"optuna.storages.journal.JournalFileBackend(<storage>)))")
    else:
        how = f"optuna.load_study(study_name={doc['study_name']!r}, storage=<storage>)"
    return (f"# Optuna study summary (nas.tune). Load the study: nas.tune.load_study(<this file or its folder>)\n"
            f"# or {how}\n# Browse it: optuna-dashboard <storage>\n")


def write_best(study: optuna.Study, where: dict, out: str, metric: str) -> dict:
    """Write RUN/best.yaml and RUN/figures/; returns best.yaml's content."""
    drawn, skipped = draw_figures(study, os.path.join(out, "figures"))
    doc = summarize(study, where, metric)
    doc["figures"] = {name: os.path.relpath(path, out) for name, path in drawn.items()}
    if skipped:
        doc["figures_skipped"] = skipped
    path = os.path.join(out, "best.yaml")
    with atomic_write(path) as f:
        f.write(_header(doc))
        yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=None)
    return doc
