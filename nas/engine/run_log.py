"""What a run reports: ``log.jsonl``, TensorBoard events under ``tb/``, progress lines on stderr.

``log.jsonl`` holds one line per finished epoch (its record, with an ``epoch`` key) and one line per event
(``{"event": "resumed", ...}``, ``{"event": "checkpoint_fallback", ...}``, with ``epochs_done``, never an
``epoch`` key); read the epochs with ``epoch_records``. The checkpoint is the commit point of an epoch: a run that resumes from epoch E first drops
the epoch lines after E (``commit``), so an epoch redone after a failed checkpoint is logged once.

The TensorBoard writer is opened at the first value written, so a command that fails before leaves no event
file. Only rank 0 writes; on other ranks every method is a no-op.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

from nas.atomic import atomic_write, write_error

LOG_FILE = "log.jsonl"


def read_log(path: str) -> list[dict]:
    """Every line of a ``log.jsonl`` (epoch records and events), in order; [] when there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash or a full disk
    return out


def epoch_records(path: str) -> dict[int, dict]:
    """{epoch: its record} of a ``log.jsonl``, events left out (an epoch logged twice keeps its last line)."""
    return {r["epoch"]: r for r in read_log(path) if "event" not in r and "epoch" in r}


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` (hours only when needed); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_value(v) -> str:
    """A number with about three significant digits that stays truthful below 1 (0.42 img/s, not 0)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


class ProgressBar:
    """One line per pass: redrawn in place on a terminal, printed every ~10% when stderr is not one.

    start: units already done before this process (a resumed epoch); rates and ETAs count only the rest.
    run_eta: callable(seconds left in this pass) -> seconds left in the run, shown after the pass's ETA.
    """

    redraw_s = 0.1  # a terminal redraw at most this often (the last one always)
    line_s = 5.0  # a plain line at most this often (and at each tenth done): short passes print their end only

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None, start: int = 0, run_eta=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.enabled, self.start_done = total, desc, enabled, start
        self.tty = enabled and self.stream.isatty()
        self.run_eta = run_eta
        self.t0 = time.perf_counter()
        self.last_decile, self.last_draw, self.open = -1, self.t0, False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def seconds_left(self, done: int) -> float:
        new = done - self.start_done
        return self.elapsed() / new * (self.total - done) if new > 0 else float("nan")

    def update(self, done: int, **fields) -> None:
        if not self.enabled:
            return
        final = done >= self.total
        now = time.perf_counter()
        if self.tty and not final and now - self.last_draw < self.redraw_s:
            return
        decile = 10 * done // max(1, self.total)
        if not self.tty and not final and (decile == self.last_decile or now - self.last_draw < self.line_s):
            return
        self.last_decile, self.last_draw = decile, now
        width = 20
        filled = width * done // max(1, self.total)
        text = " ".join(f"{k} {format_value(v)}" for k, v in fields.items())
        left = self.seconds_left(done)
        times = f"{format_duration(self.elapsed())} elapsed" + ("" if final else f", eta {format_duration(left)}")
        if self.run_eta is not None and not final:
            times += f", run eta {format_duration(self.run_eta(left))}"
        line = f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text} | {times}"
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            # clear to the end of the line: a shorter line must not leave the old one's tail behind
            self.stream.write("\r" + line[:max(columns - 1, 20)] + "\x1b[K")
            self.open = True
            if final:
                self.close()
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a terminal line left open (before other output, or when a pass is cut short)."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True, progress: bool = True,
                 interval: int = 50):
        """interval: steps between per-step TensorBoard values (loss, lr)."""
        self.run_dir, self.enabled, self.progress_enabled = run_dir, enabled, enabled and progress
        self.tensorboard, self.interval = enabled and tensorboard, interval
        self._writer = None
        self.purge_step = None
        self.bar: ProgressBar | None = None
        self.epoch_seconds: list[float] = []
        self.path = os.path.join(run_dir, LOG_FILE)

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (None when TensorBoard is off), opened on first use."""
        if self._writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=self.purge_step)
        return self._writer

    def progress(self, total: int, desc: str, start: int = 0, epochs_after: int | None = None) -> ProgressBar:
        """A progress line for a pass of ``total`` steps. epochs_after: whole epochs left after this one, for
        the run's ETA (from this process's finished epochs, else from this pass's own pace)."""
        if self.bar is not None:
            self.bar.close()
        eta = None if epochs_after is None else (lambda left: self._run_eta(left, epochs_after))
        self.bar = ProgressBar(total, desc, self.progress_enabled, start=start, run_eta=eta)
        return self.bar

    def _run_eta(self, left: float, epochs_after: int) -> float:
        if self.epoch_seconds:
            per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds)
        else:  # the first epoch of this process: its projected length
            per_epoch = self.bar.elapsed() + left
        return left + epochs_after * per_epoch

    def commit(self, epoch: int, step: int) -> None:
        """Resuming from a checkpoint of ``epoch`` (global ``step``): drop the epoch lines logged after it by a
        run whose checkpoint did not get written, and hide its later TensorBoard values."""
        if not self.enabled:
            return
        self.purge_step = step if step > 0 else None
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            raw = sum(1 for line in f if line.strip())
        kept = [r for r in read_log(self.path) if "event" in r or r.get("epoch", 0) <= epoch]
        if len(kept) != raw:
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def _append(self, entry: dict) -> None:
        data = (json.dumps(entry) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.path, exc) from None
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)  # no half line for the next append to run into
            raise write_error(self.path, exc) from None
        finally:
            os.close(fd)

    def epoch(self, record: dict) -> None:
        """Append one epoch's record to log.jsonl and its numbers to TensorBoard under ``epoch/``."""
        if not self.enabled:
            return
        self._append(record)
        if "epoch_time_s" in record:
            self.epoch_seconds.append(record["epoch_time_s"])
        self.scalars({f"epoch/{k}": v for k, v in record.items() if k != "epoch"}, record["epoch"])
        self.flush()

    def event(self, kind: str, **fields) -> None:
        """Append an event line (``resumed``, ``checkpoint_fallback``, ...) to log.jsonl."""
        if self.enabled:
            self._append({"event": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})

    def write_tensorboard(self, call) -> None:
        """call(SummaryWriter): a write whose failure (a full disk) becomes the one-line WriteError."""
        try:
            call(self.writer)
        except OSError as exc:  # the writer's thread reports a full disk on the next call
            raise write_error(os.path.join(self.run_dir, "tb"), exc) from None

    def scalars(self, values: dict, step: int) -> None:
        if not self.tensorboard:
            return
        finite = {t: v for t, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if finite:
            self.write_tensorboard(lambda w: [w.add_scalar(tag, value, step) for tag, value in finite.items()])

    def step(self, values: dict, step: int) -> None:
        """Per-step values (``step/loss``, ``step/lr``, ...), every ``interval`` steps."""
        if step % self.interval == 0:
            self.scalars(values, step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.tensorboard:
            self.write_tensorboard(lambda w: w.add_figure(tag, fig, step, close=False))

    def flush(self) -> None:
        if self._writer is not None:
            self.write_tensorboard(lambda w: w.flush())

    def info(self, message: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
