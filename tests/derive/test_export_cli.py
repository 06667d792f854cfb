"""derive.py RUN --export onnx: a run's derived model written as ONNX and checked in onnxruntime (the freshly built
model to RUN/model.onnx, a retraining's weights to OUT/model.onnx); a missing package is one line, exit 2, before
anything is derived."""
import importlib.util
import os

import pytest
import torch

from nas.cli.derive import main as derive_main
from nas.derive.onnx_file import export_run
from nas.engine import checkpoint
from nas.models import create_model
from nas import config as cfglib
from tests.derive.test_derive import synthetic_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ALPHAS = [[0.1 * i for i in range(8)]]


def test_export_of_the_fresh_and_the_retrained_model(tmp_path, capsys):
    run = synthetic_run(str(tmp_path / "run"), "local_vim_demo_search", ALPHAS, img_size=16, depth=1, embed_dim=16)
    assert derive_main([run, "--export", "onnx"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {run}/model.onnx: local_vim_demo freshly built from {run}/arch.yaml")
    assert float(line.split("within ")[1].split(" ")[0]) < 1e-4 and not os.path.exists(os.path.join(run, "retrain"))
    # a retraining's folder as the loop leaves it: its config and best.pt (weights saved from a compiled model)
    out = str(tmp_path / "retrain")
    os.makedirs(out)
    torch.manual_seed(1)
    model = create_model("local_vim_demo", directions=os.path.join(run, "arch.yaml"), depth=1, embed_dim=16,
                         img_size=16, num_classes=3)
    cfglib.save({"model": "local_vim_demo", "arch": os.path.join(run, "arch.yaml"), "directions": model.directions,
                 "model_args": {"depth": 1, "embed_dim": 16}, "img_size": 16}, os.path.join(out, "config.yaml"))
    checkpoint.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}},
                    os.path.join(out, "best.pt"))
    line = export_run(run, out)
    assert line.startswith(f"wrote {out}/model.onnx: the retrained weights of {out}/best.pt;")
    assert float(line.split("within ")[1].split(" ")[0]) < 1e-4


def test_a_missing_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    run = synthetic_run(str(tmp_path / "run"), "local_vim_demo_search", ALPHAS, img_size=16, depth=1, embed_dim=16)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert derive_main([run, "--export", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("export: the onnxruntime package is not installed; install the export extra: "
                        "pip install -e '.[export]'") and "\n" not in err
    assert not os.path.exists(os.path.join(run, "arch.yaml"))
