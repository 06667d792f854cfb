"""What a run reports: ``log.jsonl`` (one line per epoch), TensorBoard events under ``tb/``, a progress bar.

Only rank 0 writes; on other ranks every method is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


class ProgressBar:
    """One line per epoch: redrawn in place on a terminal, printed every ~10% when piped to a file."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.desc, self.enabled, self.stream = total, desc, enabled, stream
        self.tty = enabled and stream.isatty()
        self.start = time.perf_counter()
        self.last_print = -1

    def update(self, done: int, **fields) -> None:
        if not self.enabled:
            return
        decile = 10 * done // max(1, self.total)
        if not self.tty and decile == self.last_print and done != self.total:
            return
        self.last_print = decile
        width = 20
        filled = width * done // max(1, self.total)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, progress: bool = True):
        self.run_dir, self.enabled, self.progress_enabled = run_dir, enabled, enabled and progress
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def progress(self, total: int, desc: str) -> ProgressBar:
        return ProgressBar(total, desc, self.progress_enabled)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)

    def epoch(self, record: dict) -> None:
        """Append one epoch's record to log.jsonl and its numbers to TensorBoard under ``epoch/``."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, record["epoch"])
        if self.writer is not None:
            self.writer.flush()

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
