"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every writer of run files goes through ``atomic_write``: the data goes to a uniquely named temporary
file in the target's folder (same filesystem, so the rename is atomic), is fsynced, then renamed over
the target. On any failure the temporary file is removed and the target is untouched; a failing write
(a full disk, a read-only folder) is a ``UserError`` naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import tempfile

from nas.errors import UserError

TEMP_MARK = ".tmp-"  # every temporary file is named ".<target name>.tmp-<pid>-<random>"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; run files get the mode open() would give them


class WriteError(UserError):
    """A file could not be written (full disk, no permission, not a folder)."""


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """``with atomic_write(path) as f: f.write(...)``; mode "w" (text) or "wb" (bytes)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARK}{os.getpid()}-", dir=folder)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write here ({_reason(exc)})") from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


@contextlib.contextmanager
def exclusive_lock(path: str):
    """``with exclusive_lock(path):`` one process at a time (an OS ``flock`` on ``path``, created if missing; others
    wait). The kernel drops it when the holder exits however it exits, so it is never stale; the file stays
    (removing it while another process waits on it would let two in). A lock file that cannot be made is a
    ``WriteError``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def write_error(path: str, exc: OSError) -> WriteError:
    """The one-line error for a failed write of ``path`` (for writers that cannot be atomic: appends)."""
    return WriteError(f"{path}: could not be written ({_reason(exc)})")


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temporary files that a killed writer left in ``folder`` (not recursive); returns them."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".*{TEMP_MARK}*")):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
            removed.append(tmp)
    return removed


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or type(exc).__name__
