"""``derive.py RUN --export onnx``: the run's derived model as ONNX, checked in onnxruntime.

The retrained weights when the retraining folder holds a checkpoint (best.pt, else last.pt), else the derived
model freshly built from ``RUN/arch.yaml`` (its initial weights: the file then carries the architecture only).
"""
from __future__ import annotations

import os

import torch

from nas import config as cfglib
from nas.engine import checkpoint
from nas.models import create_model, load_checkpoint, read_state_dict
from nas.models.export_onnx import export_onnx, onnx_logits
from nas.derive.retrain import retrained_directions


def _retrained(out: str):
    """(model with the retrained weights, checkpoint path), or None when ``out`` holds no retraining."""
    saved = os.path.join(out, "config.yaml")
    ckpt = next((p for p in (os.path.join(out, n) for n in ("best.pt", "last.pt")) if os.path.isfile(p)), None)
    if ckpt is None or not os.path.isfile(saved):
        return None
    cfg = cfglib.load_yaml(saved, "--out")
    state = read_state_dict(checkpoint.load(ckpt)["model"])
    head = state.get("head.weight", state.get("classifier.head.weight"))
    model = create_model(cfg["model"], directions=retrained_directions(cfg), **(cfg.get("model_args") or {}),
                         img_size=cfg["img_size"], num_classes=0 if head is None else head.shape[0])
    return load_checkpoint(model, state), ckpt, cfg["img_size"]


def export_run(run_dir: str, out: str) -> str:
    """Write OUT/model.onnx (OUT: the retraining folder; RUN/model.onnx when it holds no retraining) and check it
    in onnxruntime; returns the line to print."""
    found = _retrained(out)
    if found is not None:
        model, source, img_size = found
        what = f"the retrained weights of {source}"
    else:
        arch_path = os.path.join(run_dir, "arch.yaml")
        arch = cfglib.load_yaml(arch_path, "arch")
        search = cfglib.load_yaml(os.path.join(run_dir, "config.yaml"), "run")
        img_size = search.get("img_size", 224)
        model = create_model(arch["model"], directions=arch_path, **(arch.get("model_args") or {}), img_size=img_size)
        what = f"{arch['model']} freshly built from {arch_path} (no retraining in {out})"
    # beside the weights it holds: a fresh model's file goes in RUN, leaving the retraining folder to a retraining
    path = export_onnx(model, os.path.join(out if found else run_dir, "model.onnx"), img_size)
    x = torch.randn(2, 3, *((img_size,) * 2 if isinstance(img_size, int) else img_size))
    with torch.no_grad():
        error = (onnx_logits(path, x) - model.eval()(x)).abs().max().item()
    return f"wrote {path}: {what}; onnxruntime's logits within {error:.1e} of PyTorch's (batch is dynamic)"
