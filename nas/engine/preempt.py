"""Ctrl-C and SIGTERM (how schedulers preempt jobs) stop a run at the next step boundary, with a checkpoint.

``StopSignals`` turns the first SIGINT or SIGTERM into a request that the loop reads after every step (and
every evaluation batch); the loop then writes a checkpoint of the current step and raises ``Preempted``.
A second signal stops at once (``KeyboardInterrupt``), keeping the last checkpoint written. DataLoader
workers ignore both signals (``nas.data.loader``): the main process decides when they stop.
"""
from __future__ import annotations

import signal
import threading

from nas.errors import UserError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(UserError):
    """The run stopped on a signal after saving a checkpoint of its current step.

    A UserError so that every command line prints it as one line; the ones that know their own command
    catch it first to print how to resume and exit with ``exit_code``."""

    def __init__(self, signum: int, where: str, checkpoint: str | None):
        self.signum = signum
        saved = f"saved {checkpoint}" if checkpoint else "rank 0 saved the checkpoint"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {saved}; the same command "
                         f"continues from there")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


class StopSignals:
    """``with StopSignals(notify) as stop:`` ... ``if stop.signum: ...``.

    notify(message) is told when the first signal arrives. Outside the main thread (where Python cannot
    install handlers) it does nothing and ``signum`` stays None.
    """

    def __init__(self, notify=None):
        self.notify = notify
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum
        if self.notify is not None:
            self.notify(f"{signal.Signals(signum).name} received: saving a checkpoint of the current step "
                        f"(send it again to stop at once)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

