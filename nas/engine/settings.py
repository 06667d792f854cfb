"""What every ``train:`` and ``log:`` key of a run may hold, checked before a run folder is touched.

``check_train(train)`` raises ``ConfigError`` (one line: key, what was expected, what was given) for the
first bad value; ``TRAIN_CHECKS`` covers every key of ``nas.engine.loop.TRAIN_DEFAULTS`` (a test keeps
them in step), and callers with more keys (the retraining recipe) pass their own checks as well.
``LOG_DEFAULTS`` is the ``log:`` section every run has (read by ``nas.engine.session.open_run``).
"""
from __future__ import annotations

import re

import torch

from nas.config import BOOLEAN, ConfigError, Check, choice, integer, number, validate

AMP_MODES = ("auto", "bf16", "none")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

LOG_DEFAULTS = {"tensorboard": True, "progress": True, "step_interval": 50}  # steps between per-step TB values
LOG_CHECKS = {"log.tensorboard": BOOLEAN, "log.progress": BOOLEAN, "log.step_interval": integer(1)}

TRAIN_CHECKS = {
    "epochs": integer(1),
    "batch_size": integer(1),
    "workers": integer(0),
    "lr": number(0, low_open=True),
    "min_lr": number(0),
    "warmup_epochs": integer(0),
    "warmup_lr": number(0),
    "weight_decay": number(0),
    "label_smoothing": number(0, 1, high_open=True),
    "clip_grad": number(0).or_none("no clipping"),
    "amp": choice(*AMP_MODES),
    "max_bad_steps": integer(1),
    "device": Check("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and bool(_DEVICE.match(v))),
    "stop_after_epochs": integer(1).or_none("run to train.epochs"),
    "compile": BOOLEAN,
}


def check_train(train: dict, extra: dict | None = None) -> None:
    """Validate a ``train:`` section: types and ranges, then that the asked device exists."""
    validate(train, {**TRAIN_CHECKS, **(extra or {})}, "train.")
    device = train.get("device", "auto")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {device!r} was asked for but this machine has no CUDA device "
                              f"(use auto or cpu)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: {device!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
