"""search.py --tune: a study of tiny searches, its best.yaml, shared and resumed studies, stale trials."""
import json
import os
import signal
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from tune_testing import TINY, demo_with, worker

from nas.cli.search import main
from nas.tune import load_study

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished(study):
    return [t for t in study.trials if t.state in FINISHED]


def test_three_trial_study_writes_a_best_yaml_that_loads(tmp_path):
    out = str(tmp_path / "study")
    # a pruner that may stop a trial after its first epoch, so both outcomes can occur
    assert main(TINY + ["--tune", "3", "--out", out, "--tune.pruner.n_startup_trials", "1",
                        "--tune.pruner.n_warmup_steps", "0", "--tune.sampler.n_startup_trials", "2"]) == 0
    best = yaml.safe_load(open(os.path.join(out, "best.yaml")))
    for key in ("study_name", "storage", "best_trial", "value", "params", "run_dir"):
        assert best[key] is not None, key
    assert best["storage_type"] == "rdb" and best["study_name"] == "study"
    assert best["storage"] == f"sqlite:///{out}/study.db"  # the default: a SQLite file in the run folder
    # the storage it names opens with plain Optuna, as the header of best.yaml says
    study = optuna.load_study(study_name=best["study_name"], storage=best["storage"])
    assert len(study.trials) == 3 and len(finished(study)) == 3
    assert study.best_trial.number == best["best_trial"] and study.best_value == best["value"]
    assert set(best["params"]) == {"strategy.name", "strategy.alpha_lr", "strategy.alpha_warmup_epochs", "train.lr"}
    assert best["run_dir"] == os.path.join(out, f"trial_{best['best_trial']:04d}")
    assert os.path.isfile(os.path.join(best["run_dir"], "last.pt"))
    trial_cfg = yaml.safe_load(open(os.path.join(best["run_dir"], "config.yaml")))
    assert trial_cfg["strategy"]["alpha_lr"] == best["params"]["strategy.alpha_lr"]
    assert trial_cfg["data"]["val_path"].endswith("selection.txt")  # scored on held-out training images
    selection = set(open(os.path.join(out, "selection", "selection.txt")))
    trained_on = set(open(os.path.join(best["run_dir"], "train_files.txt")))
    assert selection and trained_on and not selection & trained_on
    for t in study.trials:  # every epoch was reported to the pruner
        assert t.intermediate_values and min(t.intermediate_values) == 1
    assert os.path.getsize(os.path.join(out, "figures", "optimization_history.png")) > 0
    assert load_study(out).study_name == "study" and len(load_study(best["storage"]).trials) == 3
    # running the command again finds the study done and adds nothing
    assert main(TINY + ["--tune", "3", "--out", out]) == 0
    assert len(load_study(out).trials) == 3


def test_database_url_storage(tmp_path):
    out, url = str(tmp_path / "rdb"), f"sqlite:///{tmp_path / 'studies.db'}"
    assert main(TINY + ["--tune", "1", "--out", out, "--storage", url, "--study", "s1", "--epochs", "1"]) == 0
    best = yaml.safe_load(open(os.path.join(out, "best.yaml")))
    assert best["storage"] == url and best["storage_type"] == "rdb" and best["study_name"] == "s1"
    assert len(optuna.load_study(study_name="s1", storage=url).trials) == 1


def test_two_worker_processes_share_one_study(tmp_path):
    out = str(tmp_path / "shared")
    # heartbeats every second: both workers' heartbeat threads write to the SQLite file beside their trials
    argv = TINY + ["--tune", "4", "--out", out, "--tune.heartbeat.interval", "1", "--tune.heartbeat.grace_period", "60"]
    procs = [worker(argv), worker(argv)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert not any("database is locked" in log for log in logs), logs
    assert os.path.isfile(os.path.join(out, "study.db"))
    study = load_study(out)
    assert 4 <= len(finished(study)) <= 5  # 5 only when both start a last trial at the same moment
    assert all(t.state in FINISHED for t in study.trials)
    assert {t.user_attrs["pid"] for t in study.trials} == {p.pid for p in procs}  # both did trials
    folders = [t.user_attrs["run_dir"] for t in study.trials]
    assert len(set(folders)) == len(folders)


def epoch_lines(run_dir):
    """The epoch records of a run's log.jsonl as written (events left out)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [line for line in f if line.strip() and "event" not in json.loads(line)]


def test_killed_worker_trial_is_retried_on_rerun(tmp_path):
    out = str(tmp_path / "killed")
    argv = TINY + ["--tune", "2", "--out", out, "--epochs", "3"]
    proc = worker(argv)
    first = os.path.join(out, "trial_0000")
    deadline = time.time() + 120
    while not os.path.isfile(os.path.join(first, "last.pt")):  # the first trial's epoch 1 is checkpointed
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = epoch_lines(first)[:1]
    assert load_study(out).trials[0].state == TrialState.RUNNING  # what the kill left behind
    rerun = worker(argv)  # at once: the dead worker's trial is failed without waiting for its heartbeat to age
    log = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, log
    study = load_study(out)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and TrialState.RUNNING not in states
    assert len(finished(study)) == 2
    retry = study.trials[1]  # re-queued with the killed trial's parameters; it continues that trial's folder
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
    assert retry.params == study.trials[0].params
    assert retry.user_attrs["run_dir"] == first and retry.user_attrs["pid"] == rerun.pid
    lines = epoch_lines(first)  # from its checkpoint: epoch 1 was not trained again
    assert len(lines) == 3 and lines[:1] == logged, lines
    assert sorted(retry.intermediate_values) == [1, 2, 3]


LR = {"type": "float", "low": 1.0e-3, "high": 1.0e-2}


@pytest.mark.parametrize("tune,argv,message", [
    ({"params": {"train.lrr": LR}}, [], "tune.params: unknown parameter 'train.lrr'"),
    ({"params": {"train": {"lr": {**LR, "type": "gaussian"}}}}, [], "tune.params.train.lr.type"),
    ({"params": {"train.lr": {**LR, "low": 1.0}}}, [], "tune.params.train.lr: expected float low < high"),
    ({"params": {"train.lr": {**LR, "low": 0.0, "log": True}}}, [], "a log scale needs low > 0"),
    ({"params": {"strategy.name": {"type": "categorical", "choices": ["joint", "nope"]}}}, [],
     "unknown strategy 'nope'"),
    ({"params": {"tune.pruner.name": {"type": "categorical", "choices": ["median"]}}}, [], "cannot be tuned"),
    ({"params": {}}, [], "the search space is empty"),
    ({"heartbeat": {"interval": 60, "grace_period": 10}}, [], "tune.heartbeat.grace_period"),
    ({}, ["--tune.prunerr", "median"], "unknown key 'tune.prunerr'"),
    ({}, ["--tune.pruner.name", "asha"], "tune.pruner.name: expected one of median, hyperband, none"),
    ({}, ["--tune.selection_fraction", "1.5"], "tune.selection_fraction"),
    ({}, ["--tune", "0"], "--tune: expected a number of trials >= 1"),
])
def test_bad_tune_config_is_one_line_exit_2(tmp_path, capsys, tune, argv, message):
    out = tmp_path / "bad"
    assert main(demo_with(tmp_path, **tune) + ["--tune", "2", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search.py: error: ") and message in err[0], err
    assert not (out / "study.db").exists()


def test_a_study_refuses_another_space_and_a_search_folder(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(TINY + ["--tune", "1", "--out", out, "--epochs", "1"]) == 0
    assert main(TINY + ["--tune", "2", "--out", out, "--epochs", "1", "--tune.params.train.lr",
                        "{type: float, low: 0.001, high: 0.01}"]) == 2
    assert "that study was made for another setup (it differs in params)" in capsys.readouterr().err
    search = str(tmp_path / "search")
    assert main(TINY + ["--out", search, "--epochs", "1"]) == 0
    assert main(TINY + ["--tune", "1", "--out", search]) == 2
    assert "holds a search run" in capsys.readouterr().err
