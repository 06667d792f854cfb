"""What every training run does around the loop: join the process group, check, create and lock the run
folder, wrap the model for data parallelism, find the checkpoint to resume from.

The run folder is the only record of a run, so: ``check_out_folder`` refuses a bad ``--out`` before anything
is written; ``run_folder`` creates it, holds its lock for the whole command, removes the temporary files a
killed writer left, and removes the folder again if this command created it and fails before its first
checkpoint (no empty run folders); ``find_resume`` falls back to ``prev.pt`` or ``best.pt`` when ``last.pt``
cannot be read, and ``use_resume`` sets the damaged file aside and records what was lost.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field

import torch

from nas import config as cfglib
from nas.atomic import remove_stale_temps
from nas.engine import checkpoint
from nas.engine.distributed import DistEnv, broadcast_object, setup, teardown
from nas.engine.lock import RunLock, probe_lock
from nas.engine.preempt import StopSignals
from nas.engine.run_log import RunLogger
from nas.engine.threads import set_threads
from nas.errors import UserError


def run_in_process_group(device: str, fn, *args):
    """fn(env, *args) inside the process group torchrun asked for (or a single process)."""
    env = setup(device)
    try:
        return fn(env, *args)
    finally:
        teardown()


def check_out_folder(out: str, argument: str = "--out") -> None:
    """Refuse, without writing anything, an ``out`` that cannot become a run folder or is in use."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{argument} {out}: this is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{argument} {out}: {parent} is a file, so no folder can be made under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{argument} {out}: {parent} is not writable")
    if os.path.isdir(out):
        probe_lock(out, argument)


def _clean(out: str) -> None:
    for folder in (out, os.path.join(out, "figures")):
        if os.path.isdir(folder):
            remove_stale_temps(folder)


@contextlib.contextmanager
def run_folder(out: str, env: DistEnv, argument: str = "--out"):
    """``with run_folder(out, env):`` the command's run folder, created (rank 0) and locked until the block
    ends. A folder this command created is removed again when the block fails before writing last.pt."""
    error, created, lock = None, False, None
    if env.is_main:
        created = not os.path.isdir(out)
        try:
            os.makedirs(out, exist_ok=True)
            lock = RunLock(out, argument).acquire()
            _clean(out)
        except UserError as exc:  # locked by another process, or its lock file cannot be written
            error = str(exc)
        except OSError as exc:
            error = f"{argument} {out}: cannot create the run folder ({exc.strerror or exc})"
        if error is not None:
            if created:
                shutil.rmtree(out, ignore_errors=True)
    error = broadcast_object(error)  # every rank learns whether rank 0 got the folder; also the barrier
    if error is not None:
        raise UserError(error)
    try:
        yield
        broadcast_object(None)  # no rank leaves (and tears the process group down) before rank 0 has written all
    except BaseException:
        if created and not os.path.isfile(os.path.join(out, "last.pt")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def data_parallel(model, env: DistEnv, find_unused_parameters: bool = False, compile: bool = False):
    """The module that runs the training steps: DDP-wrapped under torchrun, else the model itself; with
    ``compile`` (train.compile) under torch.compile. Checkpoints save ``model``, never this wrapper."""
    model.to(env.device)
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    return torch.compile(model) if compile else model


RUN_KEYS = ("model", "optimizer", "task", "loop", "rng")  # what a run checkpoint must hold to resume from
FALLBACKS = (checkpoint.PREVIOUS, "best.pt")


@dataclass
class ResumePoint:
    """The checkpoint a run continues from. damaged: the files tried before it that could not be read."""

    state: dict
    name: str
    damaged: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        loop = self.state["loop"]
        if loop.get("batch"):
            return f"epoch {loop['epoch'] + 1}, batch {loop['batch']}, step {loop['step']}"
        return f"epoch {loop['epoch']}, step {loop['step']}"


def find_resume(out: str) -> ResumePoint | None:
    """The newest readable run checkpoint in ``out`` (``last.pt``, else the newer of ``prev.pt`` and
    ``best.pt``), None when there is none; every checkpoint there damaged is a CheckpointError."""
    damaged, readable = [], []
    for name in ("last.pt",) + FALLBACKS:
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        try:
            state = checkpoint.load(path, RUN_KEYS)
        except checkpoint.CheckpointError as exc:
            damaged.append(str(exc).removeprefix("checkpoint: "))
            continue
        if name == "last.pt":
            return ResumePoint(state, name)
        readable.append(ResumePoint(state, name, damaged))
    if readable:
        return max(readable, key=lambda r: (r.state["loop"]["step"], r.state["loop"].get("batch", 0)))
    if damaged:
        raise checkpoint.CheckpointError(f"{out}: no checkpoint can be read ({'; '.join(damaged)}); move the "
                                         f"folder away to start a new run")
    return None


def use_resume(point: ResumePoint | None, out: str, env: DistEnv, logger) -> dict | None:
    """The checkpoint dict to resume from; after a fallback, rename the damaged last.pt to
    last.pt.damaged (so the next checkpoint does not keep it as prev.pt), make last.pt the checkpoint resumed
    from (the folder stays complete when nothing is left to train), warn and log what was lost."""
    if point is None:
        return None
    if point.damaged:
        last = os.path.join(out, "last.pt")
        if env.is_main:
            if os.path.isfile(last):
                os.replace(last, last + ".damaged")
            checkpoint.restore(os.path.join(out, point.name), last)
        logger.info(f"warning: {'; '.join(point.damaged)}; resuming from {point.name} ({point.where}): the "
                    f"training after it is lost and will be done again")
        logger.event("checkpoint_fallback", damaged=point.damaged, used=point.name,
                     epochs_done=point.state["loop"]["epoch"], step=point.state["loop"]["step"])
    return point.state


# Settings a stopped run may take on when it resumes: they change how it runs, not what it computes (the
# number of epochs may only grow). Everything else must match the checkpoint.
SAFE_ON_RESUME = ("train.workers", "train.stop_after_epochs", "train.device", "train.max_bad_steps", "train.compile",
                  "log")


class ResumeMismatch(UserError):
    """The command asks a stopped run to continue with settings it did not run with."""


def _is_safe(key: str, old, new, safe: tuple[str, ...]) -> bool:
    if key == "train.epochs":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return any(key == s or key.startswith(s + ".") for s in safe)


def saved_config(point: ResumePoint, out: str) -> dict:
    """The config a checkpoint ran with (older checkpoints: the run's config.yaml)."""
    if isinstance(point.state.get("config"), dict):
        return point.state["config"]
    return cfglib.load_yaml(os.path.join(out, "config.yaml"), "run config")


def resume_changes(point: ResumePoint | None, cfg: dict, out: str, argument: str = "--out",
                   also_safe: tuple[str, ...] = ()) -> dict[str, list]:
    """{key: [value in the checkpoint, value now]} of the safe changes a resume makes; a change that alters
    the model, the data, the strategy or the optimizer is a ResumeMismatch naming the keys and both values.
    Keys the checkpoint's config lacks (added to the tool since) are not compared."""
    if point is None:
        return {}
    old, new = cfglib.flatten(saved_config(point, out)), cfglib.flatten(cfg)
    changed = {k: [old[k], new.get(k)] for k in old if k in new and old[k] != new[k]}
    bad = {k: v for k, v in changed.items() if not _is_safe(k, *v, SAFE_ON_RESUME + also_safe)}
    if bad:
        parts = "; ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in bad.items())
        raise ResumeMismatch(f"{argument} {out} holds a run with other settings ({parts}); a resumed run keeps its "
                             f"model, data, strategy and optimizer settings (train.epochs may only grow): start a "
                             f"new run with another {argument}")
    return changed


@dataclass
class OpenRun:
    """What ``open_run`` hands the command: its logger, the stop signals and the checkpoint to resume from."""

    logger: RunLogger
    stop: StopSignals
    resume: dict | None


@contextlib.contextmanager
def open_run(out: str, env: DistEnv, cfg: dict, data, argument: str = "--out", also_safe: tuple[str, ...] = ()):
    """``with open_run(out, env, cfg, data) as run:`` the locked run folder with the run's files written:
    checked against the checkpoint (under the lock, as the last word), the file lists and config.yaml
    written, a ``resumed`` event logged with the safe changes, SIGINT/SIGTERM caught for the loop. Its first
    log line says how many threads PyTorch was given (``nas.engine.threads``)."""
    with run_folder(out, env, argument):
        point = find_resume(out)
        changes = resume_changes(point, cfg, out, argument, also_safe)
        logger = RunLogger(out, env.is_main, cfg["log"]["tensorboard"], cfg["log"]["progress"],
                           cfg["log"]["step_interval"])
        try:
            logger.info(set_threads(cfg["train"]["workers"]).message)
            if env.is_main:
                data.write_file_lists(out)
                cfglib.save(cfg, os.path.join(out, "config.yaml"))
            resume = use_resume(point, out, env, logger)
            loop = resume["loop"] if resume is not None else {"epoch": 0, "step": 0}
            # before anything reaches TensorBoard: what came after the checkpoint is dropped (log.jsonl) or hidden
            logger.commit(loop["epoch"], loop["step"])
            if resume is not None:
                logger.event("resumed", checkpoint=point.name, epochs_done=loop["epoch"], batch=loop.get("batch", 0),
                             step=loop["step"], changed=changes)
            with StopSignals(logger.info) as stop:
                yield OpenRun(logger, stop, resume)
        finally:
            logger.close()
