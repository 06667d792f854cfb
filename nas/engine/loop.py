"""The one training loop. The search and the retraining both run ``fit``; what differs between them
(alpha updates, path sampling, mixup, EMA, per-epoch reports) lives in a ``Task``.

Per step: set the lr from the schedule, let the task prepare (bilevel alpha step, path sampling), forward
under bf16 autocast on CUDA, skip the step if the loss is not finite on any rank (and stop after
``max_bad_steps`` in a row), backward, clip, step. Per epoch: evaluate, let the task report, log one line,
write ``last.pt`` (and ``best.pt`` when the val top-1 improves) atomically.

The checkpoint is the commit point of an epoch: what was logged after the checkpoint a run resumes from is
dropped first (``RunLogger.commit``, called by ``nas.engine.session.open_run``), so an epoch redone after a
failed checkpoint is logged once. A stop
signal (``nas.engine.preempt``) ends the run after the current step (or evaluation batch) with a checkpoint
of that point: the batch reached in the epoch and the epoch's running sums; a resume continues with the
same remaining batches in the same order (``set_epoch(..., skip_batches)``) and the same RNG states.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time

import torch
import torch.nn.functional as F

from nas.data import set_epoch
from nas.data.loader import batches_on_every_rank, skip_events
from nas.engine import checkpoint
from nas.engine.distributed import DistEnv, all_gather_object, all_reduce_sum
from nas.errors import UserError
from nas.engine.preempt import Preempted
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
    "compile": False,        # torch.compile the training module (checkpoints hold the bare model's weights either way)
}


class NonFiniteLoss(UserError):
    """The loss was not finite for too many steps in a row (a setting to change: the learning rate, amp, ...)."""


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

    def step_scalars(self, epoch: int) -> dict:
        """Extra per-step TensorBoard values (``step/...``), e.g. alpha's learning rate."""
        return {}

    def eval_model(self, model):
        return model

    def on_epoch_end(self, epoch: int, record: dict) -> dict:
        """Extra fields for the epoch's log line."""
        return {}

    def end_of_run(self) -> dict | None:
        """None to go on; else the run ends after this epoch (its checkpoint written, a ``stopped`` event logged
        with these fields), and a resume ends at once: a search's stopping rule. ``reason``: the log line's words.
        The same on every rank."""
        return None

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
        raise UserError(f"train.amp: expected 'auto', 'bf16' or 'none', got {amp!r}")
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()


def _stop_asked(stop) -> float:
    return 1.0 if stop is not None and stop.signum is not None else 0.0


def train_one_epoch(model, loader, optimizer, task: Task, cfg: dict, env: DistEnv, state: dict, epoch: int, bar,
                    logger, stop=None) -> dict | None:
    """Train from batch ``state["batch"]`` to the end of the epoch; returns the epoch's train numbers, or None
    when a stop signal reached a rank (every rank then stops after the same step, ``state`` saying where)."""
    model.train()
    steps_per_epoch = len(loader)
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    sums = state["partial"]["sums"]  # loss * n, correct, n (of the batches before a resume too)
    start = time.perf_counter() - state["partial"]["seconds"]
    skipped_before = skip_events(loader)
    lr = 0.0
    for i, (images, labels) in enumerate(loader, start=state["batch"]):
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        lr = apply_lr(optimizer, state["step"], total, warmup, cfg["warmup_lr"], cfg["min_lr"])
        task.before_step(state["step"], epoch)
        with autocast(cfg["amp"], env.device):
            loss, logits = task.loss(model, images, labels)
        # one reduction carries both flags: every rank skips a bad step together and stops after the same step
        flags = all_reduce_sum(torch.tensor([float(torch.isfinite(loss).item()), _stop_asked(stop)]))
        if flags[0].item() < env.world_size:
            state["bad_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            if state["bad_steps"] >= cfg["max_bad_steps"]:
                raise NonFiniteLoss(f"the loss was not finite for {state['bad_steps']} steps in a row (epoch {epoch}, "
                                    f"step {state['step']}); lower train.lr or set train.clip_grad")
        else:
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
            logger.step({"step/loss": loss.item(), "step/lr": lr, **task.step_scalars(epoch)}, state["step"])
        state["batch"] = i + 1
        elapsed = time.perf_counter() - start
        state["partial"]["seconds"] = elapsed
        state["partial"]["skipped"] += skip_events(loader) - skipped_before
        skipped_before = skip_events(loader)
        n_seen = max(sums[2].item(), 1.0)
        bar.update(i + 1, loss=sums[0].item() / n_seen, acc=100 * sums[1].item() / n_seen,
                   img_s=sums[2].item() * env.world_size / max(elapsed, 1e-9))
        if flags[1].item() > 0:
            bar.close()
            return None
    elapsed = time.perf_counter() - start
    sums = all_reduce_sum(sums.clone())
    n = max(sums[2].item(), 1.0)
    return {"lr": lr, "train_loss": sums[0].item() / n, "train_top1": 100 * sums[1].item() / n,
            "images_per_s": sums[2].item() / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, env: DistEnv, amp: str = "auto", prefix: str = "val", bar=None, stop=None) -> dict | None:
    """Loss, top-1 and top-5 (percent) over a loader; each rank holds a shard, the sums are reduced.
    Returns None when a stop signal reached a rank (all ranks stop at the same batch)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss * n, top1, top5, n
    common = batches_on_every_rank(loader)  # the stop check is a collective: only where every rank has a batch
    for i, batch in enumerate(loader):
        if batch is not None:  # None: every image of the batch was unreadable
            images, labels = batch[0].to(env.device), batch[1].to(env.device)
            with autocast(amp, env.device):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            sums += torch.tensor([loss.item(), topk_correct(logits, labels, 1), topk_correct(logits, labels, 5),
                                  labels.shape[0]], dtype=torch.float64)
        if bar is not None:
            bar.update(i + 1)
        if (stop is not None or env.distributed) and i < common:
            if all_reduce_sum(torch.tensor([_stop_asked(stop)])).item() > 0:
                if bar is not None:
                    bar.close()
                return None
    all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {f"{prefix}_loss": sums[0].item() / n, f"{prefix}_top1": 100 * sums[1].item() / n,
            f"{prefix}_top5": 100 * sums[2].item() / n}


def _fresh_partial() -> dict:
    """What a checkpoint written inside an epoch keeps of it, so the epoch's record covers all of it: the
    training sums (loss * n, correct, n), seconds and skipped images so far, and once the training part is
    done, its numbers (a stop during the evaluation)."""
    return {"sums": torch.zeros(3, dtype=torch.float64), "seconds": 0.0, "skipped": 0, "trained": None}


def _gather_partial(partial: dict) -> dict:
    """The partial epoch over all ranks (rank 0 writes it), to be split again by ``_own_partial``."""
    out = dict(partial, sums=all_reduce_sum(partial["sums"].clone()))
    out["skipped"] = int(all_reduce_sum(torch.tensor([partial["skipped"]])).item())
    return out


def _own_partial(partial: dict, env: DistEnv) -> dict:
    """A resumed rank's share of the saved (all-rank) sums: rank 0 carries them, the others start at zero."""
    if env.is_main:
        return dict(partial, sums=partial["sums"].clone())
    return dict(partial, sums=torch.zeros_like(partial["sums"]), skipped=0)


def new_loop_state() -> dict:
    """Where a run stands (saved as the checkpoint's ``loop``): epochs done, optimizer steps, bad steps in a
    row, the best val top-1, and the batch reached inside the current epoch with its partial numbers."""
    return {"epoch": 0, "step": 0, "bad_steps": 0, "best_top1": -1.0, "batch": 0, "partial": _fresh_partial(),
            "wall_s": 0.0}


def fit(task: Task, model, train_model, optimizer, train_loader, val_loader, cfg: dict, env: DistEnv, logger,
        run_dir: str, resume: dict | None = None, extra: dict | None = None, on_epoch=None, stop=None) -> dict:
    """Train for ``cfg["epochs"]`` epochs, resuming from a checkpoint dict when given.

    model: the bare module (its state_dict is saved); train_model: what runs the steps (DDP-wrapped or
    the same module). extra: fixed entries stored in every checkpoint (config, model name, ...).
    stop: a ``nas.engine.preempt.StopSignals``; when it has caught a signal, the loop writes a checkpoint of
    the current step (``state["batch"]`` says how far into the epoch) and raises ``Preempted``.
    Returns the last epoch's record.
    """
    state = new_loop_state()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        task.load_state_dict(resume["task"])
        state.update(resume["loop"])
        state["partial"] = _own_partial(state["partial"], env)
        ranks = resume.get("rng_ranks") or [resume["rng"]]  # older checkpoints: rank 0's state only
        checkpoint.set_rng_state(ranks[env.rank] if len(ranks) == env.world_size else resume["rng"])
        where = (f"epoch {state['epoch'] + 1} at batch {state['batch']}/{len(train_loader)}" if state["batch"]
                 else f"the end of epoch {state['epoch']}")
        logger.info(f"resumed from {where} (step {state['step']})")
    record: dict = resume["record"] if resume is not None else {}  # a finished run resumed: its last record

    def save(name: str, loop: dict) -> str:
        path = os.path.join(run_dir, name)
        rngs = all_gather_object(checkpoint.rng_state())  # each rank resumes its own dropout/mixup draws
        if env.is_main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "task": task.state_dict(),
                    "loop": loop, "rng": rngs[0], "rng_ranks": rngs, "record": record, **(extra or {})}
            checkpoint.save(ckpt, path, keep_previous=name == "last.pt")
        return path

    def preempted(where: str) -> Preempted:
        path = save("last.pt", dict(state, partial=_gather_partial(state["partial"])))
        return Preempted(stop.signum, where, path if env.is_main else None)

    end = cfg["epochs"]
    if cfg["stop_after_epochs"]:
        end = min(end, state["epoch"] + cfg["stop_after_epochs"])
    if state["epoch"] >= cfg["epochs"]:
        logger.info(f"{run_dir}: all {cfg['epochs']} epochs are done; a larger train.epochs (--epochs) trains on")
    elif resume is not None and not state["batch"] and task.end_of_run() is not None:
        logger.info(f"{run_dir}: the run ended after epoch {state['epoch']}: {task.end_of_run()['reason']}")
        return record
    for epoch in range(state["epoch"], end):
        set_epoch(train_loader, epoch, skip_batches=state["batch"])
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        bar = logger.progress(len(train_loader), f"epoch {epoch + 1}/{cfg['epochs']}", start=state["batch"],
                              epochs_after=end - epoch - 1)
        if state["partial"]["trained"] is None:  # else it stopped during the evaluation, after the training
            trained = train_one_epoch(train_model, train_loader, optimizer, task, cfg, env, state, epoch, bar,
                                      logger, stop)
            if trained is None:
                raise preempted(f"in epoch {epoch + 1} after batch {state['batch']}/{len(train_loader)}")
            state["partial"]["trained"] = trained
        skipped_val = skip_events(val_loader)
        val_start = time.perf_counter()
        evaluated = evaluate(task.eval_model(model), val_loader, env, cfg["amp"],
                             bar=logger.progress(len(val_loader), f"val {epoch + 1}/{cfg['epochs']}"), stop=stop)
        if evaluated is None:
            raise preempted(f"during the evaluation of epoch {epoch + 1}")
        skipped = all_reduce_sum(torch.tensor([state["partial"]["skipped"] + skip_events(val_loader) - skipped_val]))
        record = {"epoch": epoch + 1, **state["partial"]["trained"], **evaluated, "skipped_images": int(skipped.item())}
        record.update(task.on_epoch_end(epoch, record))
        record["peak_memory_mb"] = peak_memory_mb(env.device)
        record["epoch_time_s"] = state["partial"]["seconds"] + time.perf_counter() - val_start
        record["wall_s"] = state.get("wall_s", 0.0) + record["epoch_time_s"]  # the run's so far
        state.update(epoch=epoch + 1, batch=0, partial=_fresh_partial(), wall_s=record["wall_s"])
        improved = record["val_top1"] > state["best_top1"]
        state["best_top1"] = max(state["best_top1"], record["val_top1"])
        logger.epoch(record)
        logger.info(f"epoch {epoch + 1}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k in ("train_loss", "train_top1", "val_top1", "val_top5",
                                                                "images_per_s", "path_steps", "wall_s"))
            + (f", skipped {record['skipped_images']} unreadable images" if record["skipped_images"] else ""))
        save("last.pt", state)
        if improved:
            save("best.pt", state)
        if on_epoch is not None:
            on_epoch(record)
        ending = task.end_of_run()
        if ending is not None:
            logger.event("stopped", **{k: v for k, v in ending.items() if k != "reason"}, wall_s=record["wall_s"])
            logger.info(f"stopped after epoch {epoch + 1}: {ending['reason']}")
            break
    return record
