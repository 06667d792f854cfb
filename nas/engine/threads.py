"""How many intra-op threads a training process gives PyTorch.

PyTorch starts one thread per core of the machine, whatever else runs on it. Two processes that each
take every core (DDP on CPU, or one run beside its data-loader workers) make every elementwise op wait
at its barrier for a thread that is not running: on 2 cores the scan then runs several times slower
than on one thread. So a run takes the cores it may run on (its CPU affinity), divided among the
processes of this machine's group (torchrun's LOCAL_WORLD_SIZE) and, within each, among the main
process and its data-loader workers (which PyTorch runs on one thread each).

A thread count the user set wins: OMP_NUM_THREADS in the environment (PyTorch applies it at import),
except torchrun's own default of 1 for several local processes, which it sets only when the user did not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int
    local_processes: int
    workers: int
    user_set: bool

    @property
    def message(self) -> str:
        if self.user_set:
            return f"threads: {self.threads} (OMP_NUM_THREADS)"
        return (f"threads: {self.threads} ({_count(self.cores, 'core')} in this process's CPU affinity / "
                f"{_count(self.local_processes, 'local process', 'es')} / "
                f"(1 + {_count(self.workers, 'data-loader worker')}))")


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{'' if n == 1 else plural}"


def _user_threads(environ) -> int | None:
    value = environ.get("OMP_NUM_THREADS")
    if value is None:
        return None
    if value == "1" and int(environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        return None  # torchrun's default when the user set nothing
    try:
        return max(1, int(value))
    except ValueError:
        return None  # PyTorch itself ignores a value it cannot read


def choose_threads(workers: int, environ=os.environ) -> ThreadChoice:
    """The intra-op thread count for this process (see the module docstring)."""
    cores = len(os.sched_getaffinity(0))
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    user = _user_threads(environ)
    if user is not None:
        return ThreadChoice(user, cores, local, workers, True)
    return ThreadChoice(max(1, cores // (local * (1 + max(0, workers)))), cores, local, workers, False)


def set_threads(workers: int, environ=os.environ) -> ThreadChoice:
    """Choose the thread count and give it to PyTorch."""
    choice = choose_threads(workers, environ)
    torch.set_num_threads(choice.threads)
    return choice
