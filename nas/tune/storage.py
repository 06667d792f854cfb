"""Where a study lives, and how a killed worker's trial stops counting as running.

Storage:
- default: an Optuna journal file, ``RUN/study.journal``. Every write is one appended line under a file lock
  (``JournalFileBackend`` with its default symlink lock), so any number of processes on one machine (or on a
  file system with atomic symlinks) can share it. Optuna takes a ``JournalStorage`` object, not a URL; open it
  with ``nas.tune.load_study(path)`` or as ``best.yaml`` says.
- ``--storage URL``: any database URL of Optuna's ``RDBStorage`` (``postgresql://user@host/db``,
  ``mysql+pymysql://...``), for workers on several machines; ``optuna.load_study(study_name=..., storage=URL)``
  opens it. (SQLite is an RDB URL too, but its writers lock the whole file: fine for one process, not what we
  recommend for several.)

Stale trials: a worker records a heartbeat for its running trial every ``heartbeat.interval`` seconds. Before
each trial, a worker marks FAIL every RUNNING trial whose last heartbeat is older than ``heartbeat.grace_period``
and re-queues it (``RetryHeartbeatStaleTrialCallback``: same parameters, a new trial number, up to
``heartbeat.max_retry`` times; the retry continues the killed trial's run folder from its last checkpoint).
Optuna's ``RDBStorage`` has heartbeats built in (``heartbeat_interval``, ``grace_period``,
``heartbeat_stale_trial_callback``); its ``JournalStorage`` (Optuna 5.0) has none, so
``HeartbeatJournalStorage`` adds them through the same interface (one system attribute per beat), and Optuna's
own loop then runs them. In addition a RUNNING trial of this host whose worker process no longer exists is
failed at once (``fail_dead_local_trials``), so rerunning a killed worker picks its trial up without waiting.
"""
from __future__ import annotations

import copy
import os
import socket
import time

import optuna
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from nas.tune.space import TuneError

STUDY_FILE = "study.journal"
HEARTBEAT_ATTR = "nas:heartbeat"
WORKER_ATTRS = ("host", "pid")  # user attributes naming the process that runs a trial


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage with Optuna's heartbeat interface (what ``RDBStorage`` offers)."""

    def __init__(self, path: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback=None):
        super().__init__(JournalFileBackend(path))
        self._heartbeat_interval, self._grace_period = heartbeat_interval, grace_period
        self._stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another worker already judged this trial stale
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - last > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback


def retry_callback(max_retry: int | None):
    """Optuna's retry of a stale trial, without the dead worker's host and pid (the retry is not running yet)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def callback(study, trial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS}
        retry(study, trial)
    return callback


def is_url(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str | None, run_dir: str, heartbeat: dict):
    """(Optuna storage, {"storage": URL or journal path, "storage_type": "rdb" | "journal"})."""
    callback = retry_callback(heartbeat["max_retry"])
    if storage is not None and is_url(storage):
        try:
            rdb = RDBStorage(storage, heartbeat_interval=heartbeat["interval"], grace_period=heartbeat["grace_period"],
                             heartbeat_stale_trial_callback=callback)
        except Exception as exc:  # SQLAlchemy raises many kinds: a bad URL, a missing driver, no server
            raise TuneError(f"--storage: cannot open {storage!r}: {str(exc).splitlines()[0]}") from None
        return rdb, {"storage": storage, "storage_type": "rdb"}
    path = os.path.abspath(storage or os.path.join(run_dir, STUDY_FILE))
    if os.path.isdir(path):
        raise TuneError(f"--storage: {path!r} is a folder; give a journal file path or a database URL")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    journal = HeartbeatJournalStorage(path, heartbeat["interval"], heartbeat["grace_period"], callback)
    return journal, {"storage": path, "storage_type": "journal"}


def worker_attrs() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def fail_dead_local_trials(study: optuna.Study, max_retry: int | None) -> list[int]:
    """Fail (and re-queue) RUNNING trials of this host whose worker process is gone; returns their numbers."""
    here, me = socket.gethostname(), os.getpid()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host != here or not isinstance(pid, int) or pid == me or _process_exists(pid):
            continue
        try:  # as optuna.storages.fail_stale_trials does: no public API sets another worker's trial
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                retry_callback(max_retry)(study, study._storage.get_trial(trial._trial_id))
        except UpdateFinishedTrialError:  # another worker got there first
            pass
    return failed


def load_study(path: str, study_name: str | None = None) -> optuna.Study:
    """Open a study for reading or for more trials: ``path`` is a run folder (its best.yaml, else its
    study.journal), a best.yaml, a journal file or a database URL."""
    if not is_url(path) and os.path.isdir(path):
        best = os.path.join(path, "best.yaml")
        path = best if os.path.isfile(best) else os.path.join(path, STUDY_FILE)
    if not is_url(path) and path.endswith((".yaml", ".yml")):
        with open(path) as f:
            best = yaml.safe_load(f)
        study_name = study_name or best["study_name"]
        path = best["storage"]
    if is_url(path):
        return optuna.load_study(study_name=study_name, storage=path)
    if not os.path.isfile(path):
        raise TuneError(f"load_study: {path!r} is no run folder, best.yaml, journal file or database URL")
    return optuna.load_study(study_name=study_name, storage=JournalStorage(JournalFileBackend(path)))
