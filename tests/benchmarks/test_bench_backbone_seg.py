"""bench_backbone_seg.py: the digit canvases are labelled as documented, a derived demo backbone with the FPN head
learns (the loss falls over a few steps and every backbone parameter gets a gradient), and the script's record
holds what the README quotes."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_backbone_seg as seg  # noqa: E402


def test_canvases_label_every_inked_pixel_with_its_digit():
    images, labels = seg.digit_images(1)
    x, y = seg.make_canvases(images, labels, 6, seed=0)
    assert x.shape == (6, 3, *seg.CANVAS) and y.shape == (6, *seg.CANVAS) and y.dtype == torch.long
    ink = x[:, 0] * 0.229 + 0.485  # undo Normalize's ImageNet red channel: the canvas's intensity
    clear = (ink - seg.INK).abs() > 1e-4  # away from the threshold, where undoing the normalization may round
    assert torch.equal((y > 0)[clear], (ink > seg.INK)[clear])
    assert int(y.max()) <= 10 and len(torch.unique(y)) > 3  # several digits per canvas, background included


@pytest.mark.parametrize("model", ["local_vim_demo", "local_vssm_demo"])
def test_a_few_steps_lower_the_loss_and_reach_every_stage(model):
    torch.manual_seed(0)
    x, y = seg.make_canvases(*seg.digit_images(0), 16, seed=1)
    net = seg.build(model)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for epoch in range(4):  # 8 steps of 8 canvases
        losses += seg.train_epoch(net, opt, x, y, batch=8, seed=epoch)
    assert losses[-1] < 0.7 * losses[0], losses
    net.zero_grad()
    F.cross_entropy(net(x[:4]), y[:4]).backward()
    no_grad = [name for name, p in net.backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert len(net.backbone.out_indices) == len(net.backbone.feature_info) >= 3  # every stage feeds the head


def test_the_script_records_its_result(tmp_path):
    out = tmp_path / "seg.json"
    record = seg.main(["--epochs", "1", "--train", "16", "--val", "8", "--batch", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["miou"] == record["miou"] and 0.0 <= saved["miou"] <= 1.0
    assert saved["environment"]["torch"] == torch.__version__ and saved["settings"]["model"] == "local_vim_demo"
    assert [r["epoch"] for r in saved["rows"]] == [1] and saved["feature_strides"] == [4, 4, 4, 4]
