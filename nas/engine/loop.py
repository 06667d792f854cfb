"""The one training loop. The search and the retraining both run ``fit``; what differs between them
(alpha updates, path sampling, mixup, EMA, per-epoch reports) lives in a ``Task``.

Per step: set the lr from the schedule, let the task prepare (bilevel alpha step, path sampling), forward
under bf16 autocast on CUDA, skip the step if the loss is not finite on any rank (and stop after
``max_bad_steps`` in a row), backward, clip, step. Per epoch: evaluate, let the task report, log one line,
write ``last.pt`` (and ``best.pt`` when the held-out top-1 improves) atomically.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time

import torch
import torch.nn.functional as F

from nas.data import set_epoch
from nas.engine import checkpoint
from nas.engine.distributed import DistEnv, all_reduce_sum
from nas.engine.schedule import apply_lr

TRAIN_DEFAULTS = {
    "epochs": 100,
    "batch_size": 128,       # per process
    "workers": 4,
    "lr": 1.0e-3,
    "min_lr": 1.0e-6,
    "warmup_epochs": 20,
    "warmup_lr": 1.0e-6,
    "weight_decay": 0.04,
    "label_smoothing": 0.1,
    "clip_grad": 5.0,        # max gradient norm; null: no clipping
    "amp": "auto",           # auto: bf16 autocast on CUDA, none on CPU; or "bf16" / "none"
    "max_bad_steps": 10,     # consecutive non-finite losses before the run stops
    "device": "auto",        # auto | cpu | cuda
    "stop_after_epochs": None,  # end each invocation after this many epochs (time-limited jobs); resume later
}


class NonFiniteLoss(RuntimeError):
    """The loss was not finite for too many steps in a row."""


class Task:
    """Hooks of the loop. The defaults train a classifier with label-smoothed cross-entropy.

    ``model``: the bare module the task works on (set by the subclass)."""

    label_smoothing = 0.0
    model: torch.nn.Module

    def before_step(self, step: int, epoch: int) -> None:
        """Runs before each weight step (after the lr is set)."""

    def loss(self, model, images, labels):
        """Returns (loss, logits)."""
        logits = model(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing), logits

    def before_optimizer_step(self, epoch: int) -> None:
        """Runs after the backward, before clipping and the optimizer step."""

    def clip_gradients(self, max_norm: float) -> None:
        """Clip the gradient norm (``train.clip_grad``); the default clips all parameters together."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def after_step(self) -> None:
        """Runs after each weight step."""

    def eval_model(self, model):
        return model

    def on_epoch_end(self, epoch: int, record: dict) -> dict:
        """Extra fields for the epoch's log line."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def autocast(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp != "none":
        raise ValueError(f"train.amp: expected 'auto', 'bf16' or 'none', got {amp!r}")
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()


def train_one_epoch(model, loader, optimizer, task: Task, cfg: dict, env: DistEnv, state: dict, epoch: int, bar):
    model.train()
    steps_per_epoch = len(loader)
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    start = time.perf_counter()
    lr = 0.0
    for i, (images, labels) in enumerate(loader):
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        lr = apply_lr(optimizer, state["step"], total, warmup, cfg["warmup_lr"], cfg["min_lr"])
        task.before_step(state["step"], epoch)
        with autocast(cfg["amp"], env.device):
            loss, logits = task.loss(model, images, labels)
        finite = torch.tensor([float(torch.isfinite(loss).item())])
        if all_reduce_sum(finite).item() < env.world_size:  # every rank skips together
            state["bad_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            if state["bad_steps"] >= cfg["max_bad_steps"]:
                raise NonFiniteLoss(f"the loss was not finite for {state['bad_steps']} steps in a row (epoch {epoch}, "
                                    f"step {state['step']}); lower train.lr or set train.clip_grad")
            continue
        state["bad_steps"] = 0
        loss.backward()
        task.before_optimizer_step(epoch)
        if cfg["clip_grad"]:
            task.clip_gradients(cfg["clip_grad"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_step()
        state["step"] += 1
        n = labels.shape[0]
        hard = labels if labels.dim() == 1 else labels.argmax(1)
        sums += torch.tensor([loss.item() * n, topk_correct(logits.detach(), hard, 1), n], dtype=torch.float64)
        elapsed = time.perf_counter() - start
        bar.update(i + 1, loss=sums[0].item() / sums[2].item(), acc=100 * sums[1].item() / sums[2].item(),
                   img_s=round(sums[2].item() * env.world_size / max(elapsed, 1e-9)))
    elapsed = time.perf_counter() - start
    all_reduce_sum(sums)
    n = max(sums[2].item(), 1.0)
    return {"lr": lr, "train_loss": sums[0].item() / n, "train_top1": 100 * sums[1].item() / n,
            "images_per_s": sums[2].item() / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, amp: str = "auto", prefix: str = "val") -> dict:
    """Loss, top-1 and top-5 (percent) over a loader; each rank holds a shard, the sums are reduced."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss * n, top1, top5, n
    for images, labels in loader:
        images, labels = images.to(env.device), labels.to(env.device)
        with autocast(amp, env.device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        sums += torch.tensor([loss.item(), topk_correct(logits, labels, 1), topk_correct(logits, labels, 5),
                              labels.shape[0]], dtype=torch.float64)
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {f"{prefix}_loss": sums[0].item() / n, f"{prefix}_top1": 100 * sums[1].item() / n,
            f"{prefix}_top5": 100 * sums[2].item() / n}


def fit(task: Task, model, train_model, optimizer, train_loader, val_loader, cfg: dict, env: DistEnv, logger,
        run_dir: str, resume: dict | None = None, extra: dict | None = None, on_epoch=None) -> dict:
    """Train for ``cfg["epochs"]`` epochs, resuming from a checkpoint dict when given.

    model: the bare module (its state_dict is saved); train_model: what runs the steps (DDP-wrapped or
    the same module). extra: fixed entries stored in every checkpoint (config, model name, ...).
    Returns the last epoch's record.
    """
    state = {"epoch": 0, "step": 0, "bad_steps": 0, "best_top1": -1.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        task.load_state_dict(resume["task"])
        state.update(resume["loop"])
        checkpoint.set_rng_state(resume["rng"])
        logger.info(f"resumed from epoch {state['epoch']} (step {state['step']})")
    record: dict = resume["record"] if resume is not None else {}  # a finished run resumed: its last record
    end = cfg["epochs"]
    if cfg["stop_after_epochs"]:
        end = min(end, state["epoch"] + cfg["stop_after_epochs"])
    for epoch in range(state["epoch"], end):
        set_epoch(train_loader, epoch)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        start = time.perf_counter()
        bar = logger.progress(len(train_loader), f"epoch {epoch + 1}/{cfg['epochs']}")
        record = {"epoch": epoch + 1, **train_one_epoch(train_model, train_loader, optimizer, task, cfg, env, state,
                                                        epoch, bar)}
        record.update(evaluate(task.eval_model(model), val_loader, env, cfg["amp"]))
        record.update(task.on_epoch_end(epoch, record))
        record["peak_memory_mb"] = peak_memory_mb(env.device)
        record["epoch_time_s"] = time.perf_counter() - start
        state["epoch"] = epoch + 1
        improved = record["val_top1"] > state["best_top1"]
        state["best_top1"] = max(state["best_top1"], record["val_top1"])
        logger.epoch(record)
        logger.info(f"epoch {epoch + 1}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k in ("train_loss", "train_top1", "val_top1", "val_top5",
                                                                "images_per_s")))
        if env.is_main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "task": task.state_dict(),
                    "loop": dict(state), "rng": checkpoint.rng_state(), "record": record, **(extra or {})}
            checkpoint.save(ckpt, os.path.join(run_dir, "last.pt"))
            if improved:
                checkpoint.save(ckpt, os.path.join(run_dir, "best.pt"))
        if on_epoch is not None:
            on_epoch(record)
    return record
