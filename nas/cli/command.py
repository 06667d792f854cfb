"""The one place where a command turns a user's mistake into one line and an exit code.

``UserError`` (and its subclasses, ``Preempted`` among them) prints ``PROG: error: message`` and exits 2;
a stop signal prints where the run stopped (once, on rank 0, under torchrun) and exits 128 + the signal; a
second Ctrl-C exits 130. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from nas.engine.preempt import Preempted
from nas.errors import UserError


def run_command(prog: str, body: Callable[[], None], resume_hint: Callable[[], str] = str,
                interrupted_note: Callable[[], str] = str) -> int:
    """Run ``body``; returns the exit code. ``resume_hint`` / ``interrupted_note`` are called after a stop to
    add how to continue (they see what ``body`` got to know, e.g. the run folder)."""
    try:
        body()
    except Preempted as exc:  # before UserError, which it is: it has its own exit code
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops alike: say it once
            print(f"{prog}: {exc}{resume_hint()}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        print(f"{prog}: interrupted{interrupted_note()}", file=sys.stderr)
        return 130
    return 0


def launcher() -> str:
    """How this command was started, as a resume hint writes it: ``torchrun --nproc_per_node N`` under torchrun
    on one machine, ``torchrun ...`` (the same options) on several, else ``python``."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return "python"
    local, world = os.environ.get("LOCAL_WORLD_SIZE", "1"), os.environ.get("WORLD_SIZE", "1")
    return f"torchrun --nproc_per_node {local}" if local == world else "torchrun <the same options>"
