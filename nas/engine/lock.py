"""One process per run folder: an exclusive OS file lock on ``FOLDER/.lock``.

The lock is ``flock`` on an open file, so the kernel drops it when the holder exits, however it exits
(kill -9 included): there is never a stale lock to delete by hand. The file holds the holder's pid, which the
refusal names. The file itself stays (removing it while another process waits on it would let two in).
"""
from __future__ import annotations

import fcntl
import os
import time

from nas.atomic import write_error
from nas.errors import UserError

LOCK_FILE = ".lock"
_TRIES, _PAUSE_S = 5, 0.05  # a probe (``probe_lock``) holds the lock for microseconds; wait that out


class RunLocked(UserError):
    """Another process holds the run folder."""


def _holder(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def _refusal(folder: str, holder: str, argument: str) -> RunLocked:
    return RunLocked(f"{argument} {folder}: another process (pid {holder}) is running in this folder; wait for "
                     f"it to end or choose another {argument}")


def _try_lock(fd: int, kind: int) -> bool:
    for attempt in range(_TRIES):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < _TRIES:
                time.sleep(_PAUSE_S)
    return False


def lock_holder(folder: str) -> str | None:
    """The pid of the process holding ``folder``'s lock ("unknown" if it wrote none), None when none does;
    changes nothing on disk."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None  # no lock file (or unreadable): nobody has locked the folder through it
    try:
        return None if _try_lock(fd, fcntl.LOCK_SH) else _holder(fd)
    finally:
        os.close(fd)


def probe_lock(folder: str, argument: str = "--out") -> None:
    """Raise RunLocked if a process holds ``folder``'s lock; changes nothing on disk."""
    holder = lock_holder(folder)
    if holder is not None:
        raise _refusal(folder, holder, argument)


class RunLock:
    """``RunLock(folder, "--out").acquire()`` holds the folder's lock until ``release`` (or the process ends);
    it refuses at once if another process has it."""

    def __init__(self, folder: str, argument: str = "--out"):
        self.folder, self.argument = folder, argument
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        if not _try_lock(fd, fcntl.LOCK_EX):
            error = _refusal(self.folder, _holder(fd), self.argument)
            os.close(fd)
            raise error
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
