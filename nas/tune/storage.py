"""Where a study lives, and how a killed worker's trial is failed and retried. Optuna's public API only.

Storage (``open_storage``; ``best.yaml`` records ``storage`` and ``storage_type``):
- default: a SQLite file in the run folder, ``RUN/study.db``, opened as Optuna's ``RDBStorage`` with the URL
  ``sqlite:////abs/path/RUN/study.db``. Several worker processes on one machine share it: SQLite lets one writer
  at a time hold the file lock, and a writer that finds it taken waits for it up to ``SQLITE_TIMEOUT`` seconds
  (the driver's default of 5 s is what makes busy workers fail with "database is locked"), and they open it one
  at a time (``one_opener_at_a_time``) so that a new file's tables are created once.
- ``--storage URL``: any database URL ``RDBStorage`` takes (``postgresql://user@host/db``, ``mysql+pymysql://...``,
  ``sqlite:///PATH``): a database server is what workers on several machines share (SQLite's file locks are not
  safe on network file systems). ``--storage PATH`` of an existing SQLite file means ``sqlite:///PATH``.
- journal files of earlier versions: a run folder holding ``study.journal`` keeps using it, and ``--storage PATH``
  of an existing journal file opens it (Optuna's ``JournalStorage``), so old studies load and continue.
Open any of them for reading with ``nas.tune.load_study``.

A trial that Ctrl-C or SIGTERM stopped (its run wrote a checkpoint first) is failed by Optuna and queued again at
once, with no retry limit (``requeue_stopped_trials``); like a killed worker's, its retry continues its folder.

Killed workers, two ways; both mark the trial FAIL and re-queue it with ``RetryHeartbeatStaleTrialCallback``
(same parameters, a new trial number, up to ``heartbeat.max_retry`` times); the retry continues the killed
trial's run folder from its last checkpoint (``nas.tune.study.trial_folder``):
- heartbeats (database storages): Optuna's own, ``RDBStorage(heartbeat_interval=..., grace_period=...,
  heartbeat_stale_trial_callback=...)``. While a trial runs, its worker records a heartbeat every
  ``heartbeat.interval`` seconds; before each trial, a worker fails every RUNNING trial not heard from for
  ``heartbeat.grace_period`` seconds. This covers workers on other machines (a machine that went down, a job
  killed by a scheduler).
- dead local workers (every storage): a RUNNING trial of this host whose worker process no longer exists is failed
  at once (``fail_dead_local_trials``), so rerunning a killed worker picks its trial up without waiting out the
  grace period. Optuna's ``JournalStorage`` has no heartbeats: on a journal file this is the only way.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from nas.tune.space import TuneError

STUDY_DB = "study.db"
OLD_JOURNAL = "study.journal"  # the default storage before study.db
SQLITE_TIMEOUT = 60  # seconds a SQLite writer waits for another's lock (each holds it for milliseconds)
SQLITE_HEADER = b"SQLite format 3\x00"
WORKER_ATTRS = ("host", "pid")  # user attributes naming the process that runs a trial
STOPPED = "stopped_by_signal"  # user attribute of a trial a stop signal ended: it is queued again


def is_url(storage: str) -> bool:
    return "://" in storage


def sqlite_url(path: str) -> str:
    return f"sqlite:///{os.path.abspath(path)}"


def is_sqlite_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def is_journal_file(path: str) -> bool:
    """Optuna's journal: one JSON object per line, each with an ``op_code`` (an empty file is a new journal)."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first.strip():
        return not first
    try:
        return "op_code" in json.loads(first)
    except (ValueError, TypeError):  # not JSON (or not UTF-8), or JSON but no object
        return False


def run_folder_file(run_dir: str) -> str:
    """The study file of a run folder: the study.journal an earlier version made there, else study.db."""
    journal = os.path.join(run_dir, OLD_JOURNAL)
    return journal if os.path.isfile(journal) else os.path.join(run_dir, STUDY_DB)


def locate(storage: str | None, run_dir: str) -> dict:
    """{"storage": database URL or journal path, "storage_type": "rdb" | "journal"} of ``--storage`` (None:
    the run folder's own file)."""
    if storage is None:
        path = run_folder_file(run_dir)
        if path.endswith(OLD_JOURNAL):
            return {"storage": os.path.abspath(path), "storage_type": "journal"}
        return {"storage": sqlite_url(path), "storage_type": "rdb"}
    if is_url(storage):
        return {"storage": storage, "storage_type": "rdb"}
    if not os.path.isfile(storage):
        raise TuneError(f"--storage: {storage!r} is no database URL and no existing journal or SQLite file "
                        f"(for a new SQLite file give sqlite:///{os.path.abspath(storage)})")
    if is_sqlite_file(storage):
        return {"storage": sqlite_url(storage), "storage_type": "rdb"}
    if not is_journal_file(storage):
        raise TuneError(f"--storage: {storage} is neither a SQLite database nor an Optuna journal file; give the "
                        f"study's database (its URL, or the path of its SQLite or journal file)")
    return {"storage": os.path.abspath(storage), "storage_type": "journal"}


def retry_callback(max_retry: int | None):
    """Optuna's retry of a failed trial, without the dead worker's host and pid (the retry is not running yet,
    and a trial that names a dead process would be failed again the moment it starts)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS}
        retry(study, trial)
    return callback


@contextlib.contextmanager
def one_opener_at_a_time(url: str):
    """Let one process at a time open a SQLite file (an OS lock on its folder, which works read-only too): Optuna
    creates the tables of a new database where it finds them missing, and two workers starting together would
    both create them."""
    path = sqlalchemy.engine.make_url(url).database if url.startswith("sqlite") else None
    folder = os.path.dirname(os.path.abspath(path)) if path and path != ":memory:" else None
    if folder is None or not os.path.isdir(folder):
        yield  # a database server, or no file to lock (the open fails and says why)
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, or when the process dies
        yield
    finally:
        os.close(fd)


def open_storage(storage: str | None, run_dir: str, heartbeat: dict | None):
    """(Optuna storage, {"storage": URL or journal path, "storage_type": "rdb" | "journal"}) of ``--storage``
    (None: the run folder's). ``heartbeat``: a worker's ``tune.heartbeat`` settings, with which a database
    storage fails and retries the trials of silent workers; None to read a study or add trials by hand."""
    where = locate(storage, run_dir)
    if where["storage_type"] == "journal":
        return JournalStorage(JournalFileBackend(where["storage"])), where
    url = where["storage"]
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}} if url.startswith("sqlite") else {}
    beats = {} if heartbeat is None else {
        "heartbeat_interval": heartbeat["interval"], "grace_period": heartbeat["grace_period"],
        "heartbeat_stale_trial_callback": retry_callback(heartbeat["max_retry"])}
    try:
        with one_opener_at_a_time(url):
            return RDBStorage(url, engine_kwargs=engine_kwargs, **beats), where
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:  # a bad URL, a missing driver, no server
        raise TuneError(f"cannot open the study storage {url!r}: {str(exc).splitlines()[0]}") from None


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
    retry = retry_callback(max_retry)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host != here or not isinstance(pid, int) or pid == me or _process_exists(pid):
            continue
        try:
            dead = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):  # "Cannot tell a FAIL trial": another worker was first
            continue
        retry(study, dead)
        failed.append(trial.number)
    return failed


def requeue_stopped_trials(study: optuna.Study) -> list[int]:
    """Queue again, with no retry limit, the trials a stop signal ended in this process
    (``nas.tune.study.stop_means_retry``; Optuna failed them) that are not queued yet; returns their numbers.
    The stop wrote a checkpoint, so the retry continues the trial's folder where it stopped. Only the process
    that ran a trial queues it: two workers could not both see it unqueued."""
    trials = study.get_trials(deepcopy=True)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    mine = worker_attrs()
    requeued = []
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(STOPPED) and trial.number not in retried \
                and all(trial.user_attrs.get(k) == v for k, v in mine.items()):
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != STOPPED}
            retry_callback(None)(study, trial)
            requeued.append(trial.number)
    return requeued


def load_study(path: str, study_name: str | None = None) -> optuna.Study:
    """Open a study for reading or for more trials: ``path`` is a run folder (its best.yaml, else its
    study.db or old study.journal), a best.yaml, a SQLite or journal file, or a database URL."""
    if not is_url(path) and os.path.isdir(path):
        best = os.path.join(path, "best.yaml")
        path = best if os.path.isfile(best) else run_folder_file(path)
    if not is_url(path) and path.endswith((".yaml", ".yml")):
        with open(path) as f:
            best = yaml.safe_load(f)
        study_name = study_name or best["study_name"]
        path = best["storage"]
    if not is_url(path) and not os.path.isfile(path):
        raise TuneError(f"load_study: {path!r} is no run folder, best.yaml, SQLite or journal file or database URL")
    return optuna.load_study(study_name=study_name, storage=open_storage(path, "", heartbeat=None)[0])
