"""Study storage: the SQLite default under several writers, Optuna's heartbeat, old journal files, optuna-dashboard,
and Optuna through its public API only."""
import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tune_testing import ROOT, TINY

from nas.cli.search import main
from nas.tune import load_study
from nas.tune.storage import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

HEARTBEAT = {"interval": 1, "grace_period": 3, "max_retry": 1}  # SQLite's clock has whole seconds


def python(code: str) -> subprocess.Popen:
    """A Python process running ``code`` (with nas importable), its output line by line."""
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, expected: str) -> None:
    """Read the process's output until a line says ``expected`` (Optuna's log lines come first)."""
    seen = []
    for line in proc.stdout:
        if line.strip() == expected:
            return
        seen.append(line)
    raise AssertionError(f"the process ended (exit {proc.wait()}) before printing {expected!r}:\n{''.join(seen)}")


def test_a_sqlite_writer_waits_for_another_process_lock(tmp_path):
    # The driver's default is to give up after 5 s with "database is locked"; the study's storage waits.
    storage, where = open_storage(None, str(tmp_path), None)
    assert where == {"storage": f"sqlite:///{tmp_path / 'study.db'}", "storage_type": "rdb"}
    study = optuna.create_study(study_name="lock", storage=storage)
    holder = python(f"import sqlite3, time\nc = sqlite3.connect({str(tmp_path / 'study.db')!r}, isolation_level=None)\n"
                    f"c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(6)\nc.execute('COMMIT')")
    wait_for_line(holder, "locked")
    start = time.time()
    study.set_user_attr("written", True)
    assert time.time() - start > 5
    assert holder.wait(timeout=30) == 0
    assert load_study(str(tmp_path)).user_attrs == {"written": True}
    assert open_storage(str(tmp_path / "study.db"), "elsewhere", None)[1] == where  # --storage PATH of the file


def test_heartbeat_fails_and_requeues_a_killed_workers_trial(tmp_path):
    # A worker whose trial runs until it is killed; Optuna's heartbeat thread beats every second meanwhile.
    worker = python(
        "import time, optuna\nfrom nas.tune.storage import open_storage, worker_attrs\n"
        f"storage, _ = open_storage(None, {str(tmp_path)!r}, {HEARTBEAT!r})\n"
        "study = optuna.create_study(study_name='hb', storage=storage)\n"
        "def objective(trial):\n    trial.suggest_float('x', 0, 1)\n"
        "    for key, value in worker_attrs().items():\n        trial.set_user_attr(key, value)\n"
        "    print('running', flush=True)\n    time.sleep(600)\n"
        "study.optimize(objective, n_trials=1)")
    try:
        wait_for_line(worker, "running")
        time.sleep(HEARTBEAT["grace_period"] + 0.5)  # its beats keep the trial alive past the grace period
        storage, _ = open_storage(None, str(tmp_path), HEARTBEAT)
        study = optuna.load_study(study_name="hb", storage=storage)
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.trials] == [TrialState.RUNNING]
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        time.sleep(HEARTBEAT["grace_period"] + 1.5)
        optuna.storages.fail_stale_trials(study)
        killed, retry = study.trials
        assert (killed.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
        assert retry.params == killed.params and killed.user_attrs["pid"] == worker.pid
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 0
        assert "pid" not in retry.user_attrs and "host" not in retry.user_attrs  # nobody runs the retry yet
    finally:
        worker.kill()


def make_old_run_folder(folder) -> str:
    """A run folder as earlier versions left it: a journal file with one complete trial, and a best.yaml."""
    journal = str(folder / "study.journal")
    os.makedirs(folder)
    study = optuna.create_study(study_name="old", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(journal)))
    study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.002}, value=10.0,
                                              distributions={"train.lr": FloatDistribution(5e-4, 5e-3, log=True)}))
    with open(folder / "best.yaml", "w") as f:
        yaml.safe_dump({"study_name": "old", "storage": journal, "storage_type": "journal", "best_trial": 0}, f)
    return journal


def test_an_old_journal_study_loads_and_continues(tmp_path, capsys):
    folder = tmp_path / "old"
    journal = make_old_run_folder(folder)
    assert len(load_study(str(folder)).trials) == 1 and len(load_study(journal).trials) == 1
    assert open_storage(journal, str(tmp_path / "elsewhere"), HEARTBEAT)[1] == {"storage": journal,
                                                                               "storage_type": "journal"}
    assert main(TINY + ["--tune", "2", "--epochs", "1", "--out", str(folder)]) == 0  # one more trial
    assert not (folder / "study.db").exists()
    best = yaml.safe_load(open(folder / "best.yaml"))
    assert (best["storage"], best["storage_type"], best["study_name"]) == (journal, "journal", "old")
    study = load_study(str(folder))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert study.trials[1].user_attrs["run_dir"] == str(folder / "trial_0001")
    missing = str(tmp_path / "missing.journal")
    capsys.readouterr()
    assert main(TINY + ["--tune", "1", "--out", str(tmp_path / "new"), "--storage", missing]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"search.py: error: --storage: {missing!r} is no database URL and no existing journal or SQLite file "
        f"(for a new SQLite file give sqlite:///{missing})"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, dashboard: subprocess.Popen, timeout: float = 60.0):
    """GET url once the dashboard listens."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError):
            assert dashboard.poll() is None and time.time() < deadline, dashboard.communicate()[0]
            time.sleep(0.2)


def test_optuna_dashboard_lists_the_default_storage(tmp_path):
    out = str(tmp_path / "dash")
    assert main(TINY + ["--tune", "1", "--epochs", "1", "--out", out]) == 0
    url = yaml.safe_load(open(os.path.join(out, "best.yaml")))["storage"]
    assert url == f"sqlite:///{out}/study.db"  # what best.yaml tells the user to browse
    port = free_port()
    dashboard = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "optuna-dashboard"), url,
                                  "--host", "127.0.0.1", "--port", str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies", dashboard)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", dashboard)
        assert [t["state"] for t in detail["trials"]] == ["Complete"]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


PRIVATE_ATTRIBUTES = {"_trial_id", "_storage", "_study_id"}  # of Optuna's Trial and Study


def private_optuna_names(source: str) -> list[str]:
    """Private Optuna modules and names imported or reached as ``optuna.x._y``, and the private attributes of
    Optuna's objects, in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None)
            names = [f"{module}.{a.name}" if module else a.name for a in node.names]
            found += [n for n in names if n.split(".")[0] == "optuna" and "._" in n]
        elif isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            if node.attr in PRIVATE_ATTRIBUTES or (dotted.split(".")[0] == "optuna" and node.attr.startswith("_")):
                found.append(dotted)
    return found


def test_nas_uses_optuna_through_its_public_api_only():
    old = ("import optuna\nfrom optuna.storages._heartbeat import BaseHeartbeat\nimport optuna._experimental\n"
           "study._storage.get_trial(trial._trial_id)\noptuna.storages._callbacks.RetryFailedTrialCallback\n")
    assert sorted(private_optuna_names(old)) == ["optuna._experimental", "optuna.storages._callbacks",
                                                 "optuna.storages._heartbeat.BaseHeartbeat", "study._storage",
                                                 "trial._trial_id"]
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "nas")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    names = private_optuna_names(f.read())
                if names:
                    found[os.path.relpath(path, ROOT)] = names
    assert found == {}
