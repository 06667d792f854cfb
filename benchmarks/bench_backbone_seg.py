"""Proof that a derived model trains as a dense-prediction backbone: segment the demo digits on a canvas.

Each canvas (32 x 44 pixels, an 8 x 11 token grid: neither square nor a multiple of the 2 x 2 or 7 x 7
windows) holds three of the built-in demo digits (scikit-learn's 8 x 8 digits upsampled to 14 x 14) at random
places; every pixel of a digit stroke (intensity above 0.3) is labelled 1 + its digit, the rest 0
(background), 11 classes. Training canvases are built from the demo's training digits, validation canvases
from its held-out ones.

The model is ``create_model(MODEL, features_only=True)`` (default: the demo search space's derived model,
``local_vim_demo``; ``--arch runs/NAME/arch.yaml`` builds the searched one; ``--checkpoint`` starts it from
a classification checkpoint through ``load_backbone_checkpoint``) with ``nas.models.backbone.FPNHead`` on its
feature maps, trained from scratch with per-pixel cross-entropy (AdamW, lr 3e-3 with cosine decay, batch 8,
5 epochs of 800 canvases). Prints one row per epoch (loss, pixel accuracy and mIoU on the 200 validation
canvases, time) and records them as JSON with the machine, versions and load average in
benchmarks/results/bench_backbone_seg_cpu.json. On a machine other work shares, ``--threads 1`` (torch's
threads wait on each other when the cores are busy).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import environment  # noqa: E402
from nas.atomic import atomic_write  # noqa: E402
from nas.data.demo import demo_dataset, demo_splits  # noqa: E402
from nas.data.transforms import Normalize  # noqa: E402
from nas.models import FPNHead, create_model, load_backbone_checkpoint  # noqa: E402

CANVAS = (32, 44)
DIGIT = 14
PER_CANVAS = 3
INK = 0.3
NUM_CLASSES = 11  # background + 10 digits


def digit_images(split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo digits of the train (0) or val (1) split: (n, 1, 14, 14) intensities in [0, 1], (n,) labels."""
    samples = demo_splits()[split]
    return demo_dataset(samples, DIGIT, train=False).images, torch.from_numpy(samples.labels)


def make_canvases(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int):
    """n canvases: (n, 3, 32, 44) normalized images and (n, 32, 44) int64 targets (0 background, 1 + digit);
    a later digit covers an earlier one where its ink is the stronger."""
    g = torch.Generator().manual_seed(seed)
    H, W = CANVAS
    ink = torch.zeros(n, H, W)
    target = torch.zeros(n, H, W, dtype=torch.long)
    for i in range(n):
        for j in torch.randint(len(labels), (PER_CANVAS,), generator=g).tolist():
            top = int(torch.randint(H - DIGIT + 1, (1,), generator=g))
            left = int(torch.randint(W - DIGIT + 1, (1,), generator=g))
            patch = images[j, 0]
            window = ink[i, top:top + DIGIT, left:left + DIGIT]
            stronger = (patch > window) & (patch > INK)
            target[i, top:top + DIGIT, left:left + DIGIT][stronger] = 1 + int(labels[j])
            window.copy_(torch.maximum(window, patch))
    return Normalize()(ink.unsqueeze(1)), target


class Segmenter(nn.Module):
    """A backbone's feature maps through an FPN head: (batch, 3, H, W) -> (batch, classes, H, W) logits."""

    def __init__(self, backbone: nn.Module, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = backbone
        self.head = FPNHead(backbone.feature_info.channels(), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), x.shape[-2:])


def build(model: str, arch: str | None = None, checkpoint: str | None = None) -> Segmenter:
    backbone = create_model(model, directions=arch, features_only=True, img_size=CANVAS, drop_path_rate=0.0)
    if checkpoint is not None:
        report = load_backbone_checkpoint(backbone, checkpoint)
        print(f"checkpoint: {len(report.missing)} missing (new), {len(report.unexpected)} unexpected (dropped), "
              f"resized: {', '.join(report.resized) or 'none'}")
    return Segmenter(backbone)


def train_epoch(model: Segmenter, opt, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int,
                sched=None) -> list[float]:
    """One pass over (x, y) in shuffled batches (the schedule, if any, stepped per batch); the per-step losses."""
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    losses = []
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: Segmenter, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> dict:
    """Pixel accuracy and mean IoU over the classes present in the targets or the predictions."""
    model.eval()
    pred = torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])
    inter = torch.bincount(y[pred == y], minlength=NUM_CLASSES).double()
    union = (torch.bincount(y.flatten(), minlength=NUM_CLASSES)
             + torch.bincount(pred.flatten(), minlength=NUM_CLASSES)).double() - inter
    seen = union > 0
    return {"pixel_acc": float((pred == y).double().mean()), "miou": float((inter[seen] / union[seen]).mean()),
            "iou": [round(float(v), 4) if s else None for v, s in zip(inter / union.clamp(min=1), seen)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="local_vim_demo", help="a registered model (its backbone is trained)")
    p.add_argument("--arch", default=None, help="an arch.yaml of a search run (derived models)")
    p.add_argument("--checkpoint", default=None, help="a classification checkpoint to start the backbone from")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train", type=int, default=800, help="training canvases")
    p.add_argument("--val", type=int, default=200, help="validation canvases")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_backbone_seg_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train = make_canvases(*digit_images(0), args.train, seed=args.seed)
    x_val, y_val = make_canvases(*digit_images(1), args.val, seed=args.seed + 1)
    model = build(args.model, args.arch, args.checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-args.train // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    info = model.backbone.feature_info
    print(f"{args.model} backbone: maps of {info.channels()} channels at strides {info.reduction()} "
          f"(after {info.module_name()}), canvas {CANVAS[0]} x {CANVAS[1]}, {args.train} train / {args.val} val")
    print(f"{'epoch':>5} {'loss':>8} {'pixel acc':>10} {'mIoU':>7} {'seconds':>8}")
    rows, start, cpu_start, load_before = [], time.perf_counter(), time.process_time(), os.getloadavg()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        losses = train_epoch(model, opt, x_train, y_train, args.batch, args.seed + epoch, sched)
        scores = evaluate(model, x_val, y_val)
        rows.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), **scores,
                     "seconds": time.perf_counter() - t0})
        print(f"{epoch + 1:5d} {rows[-1]['loss']:8.4f} {scores['pixel_acc']:10.4f} {scores['miou']:7.4f} "
              f"{rows[-1]['seconds']:8.1f}")
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"mIoU {rows[-1]['miou']:.4f} after {args.epochs} epochs, {total:.1f} s of training and evaluation "
          f"({cpu:.1f} s of CPU time)")
    record = {"benchmark": "bench_backbone_seg", "environment": environment("cpu"), "settings": vars(args),
              "canvas": list(CANVAS), "num_classes": NUM_CLASSES, "feature_channels": info.channels(),
              "feature_strides": info.reduction(), "rows": rows, "seconds": total, "cpu_seconds": cpu, "miou": rows[-1]["miou"],
              "load_average": {"before": load_before, "after": os.getloadavg()}}  # other work on the machine
    if args.out:
        with atomic_write(args.out) as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    main()
