"""Derived models written as ONNX (nas.models.export_onnx) and run in onnxruntime: the logits match PyTorch's
within 1e-4 (fp32) at two batch sizes (batch is a dynamic axis), on a non-square odd token grid; LocalVim from
an arch file with per-layer k and registry scan orders, LocalVMamba with the published directions (tiny widths:
exporting costs tens of seconds per model on 2 cores; the 224 models are checked in bench_inference.py). Bad
input is one line: a supernet, an image the model cannot take, a missing package."""
import importlib.util

import pytest
import torch
import yaml

from nas.errors import UserError
from nas.models import create_model
from nas.models.export_onnx import export_onnx, onnx_logits
from nas.models.registry import model_spec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def parity(model, path, img_size):
    export_onnx(model, str(path), img_size)
    for batch in (1, 3):
        x = torch.randn(batch, 3, *img_size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model.eval()(x)
        got = onnx_logits(str(path), x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_local_vim_from_an_arch_file_per_layer_k_registry_orders(tmp_path):
    arch = tmp_path / "arch.yaml"
    arch.write_text(yaml.safe_dump({"model": "local_vim_demo", "directions": [["h", "hilbert"],
                                                                              ["v", "w2_flip", "snake_v_flip"]]}))
    torch.manual_seed(0)
    model = create_model("local_vim_demo", directions=str(arch), scans_per_layer=[2, 3], depth=2, embed_dim=16,
                         patch_size=4, num_classes=5)
    parity(model, tmp_path / "vim.onnx", (20, 28))  # a 5 x 7 token grid


def test_local_vmamba_published_directions(tmp_path):
    torch.manual_seed(0)
    model = create_model("local_vssm_demo", directions=model_spec("local_vssm_demo").default_directions()[:2],
                         dims=[8, 16], depths=[1, 1], num_classes=5)
    parity(model, tmp_path / "vssm.onnx", (20, 28))  # 5 x 7, then 3 x 4 tokens


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    supernet = create_model("local_vim_demo_search", depth=1, embed_dim=16)
    with pytest.raises(UserError, match=r"^export: local_vim_demo_search is a search supernet .*derive"):
        export_onnx(supernet, str(tmp_path / "x.onnx"), 28)
    derived = create_model("local_vssm_demo", directions=model_spec("local_vssm_demo").default_directions()[:4],
                           dims=[8, 16, 16], num_classes=5)
    with pytest.raises(UserError, match=r"^input: a 3 x 28 image is smaller than local_vssm_demo's patch"):
        export_onnx(derived, str(tmp_path / "x.onnx"), (3, 28))
    with pytest.raises(UserError, match=r"^img_size: expected a positive int or \(height, width\), got 0"):
        export_onnx(derived, str(tmp_path / "x.onnx"), 0)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(UserError, match=r"^export: the onnxscript package is not installed; .*\[export\]"):
        export_onnx(derived, str(tmp_path / "x.onnx"), 28)
    assert not (tmp_path / "x.onnx").exists()
