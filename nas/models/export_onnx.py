"""A derived model out of the tool as ONNX, through PyTorch's own exporter, and its check in onnxruntime.

``torch.export`` traces the model (the scan tables are constants, the CPU kernels registered operators with fake
implementations), ``run_decompositions`` replaces those operators by standard ops (the scan's recurrence as an
ONNX Scan, ``nas.ops.scan_chunked``; the conv by PyTorch's conv), and ``torch.onnx.export`` writes the program.
The batch size is a dynamic axis; the image size is fixed at export (the scan orders depend on the token grid).
"""
from __future__ import annotations

import importlib.util

import torch

from nas.errors import UserError
from nas.models.features import check_image
from nas.models.search_space import arch_parameters
from nas.ops.scan_chunked import export_decompositions

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_export_packages(names=EXPORT_PACKAGES) -> None:
    """One-line UserError naming the missing packages and how to install them."""
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise UserError(f"export: the {', '.join(missing)} package{'s are' if len(missing) > 1 else ' is'} not "
                        f"installed; install the export extra: pip install -e '.[export]'")


def image_size(img_size) -> tuple[int, int]:
    """An int or (height, width) -> (height, width), else a one-line UserError."""
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise UserError(f"img_size: expected a positive int or (height, width), got {img_size!r}")
    return tuple(size)


def check_exportable(model: torch.nn.Module, img_size) -> tuple[int, int]:
    """A derived model (not a search supernet) that takes (height, width) images; returns (height, width)."""
    name = getattr(model, "model_name", type(model).__name__)
    if arch_parameters(model):
        raise UserError(f"export: {name} is a search supernet (every layer runs all its candidate directions); "
                        f"derive its architecture (derive.py RUN) and export the derived model")
    H, W = image_size(img_size)
    patch = model.patch_embed.patch_size if hasattr(model.patch_embed, "patch_size") else model.patch_embed[0].stride[0]
    check_image(torch.empty(1, 3, H, W, device="meta"), patch, name, "patch")
    return H, W


def export_onnx(model: torch.nn.Module, path: str, img_size, chunk: int | None = None, opset: int | None = None) -> str:
    """Write ``model`` (a derived LocalVim / LocalVMamba) as ONNX to ``path`` for (batch, 3, H, W) fp32 images,
    batch dynamic, logits (batch, num_classes) out. img_size: int or (H, W). chunk: None, the scan as an ONNX
    Scan (the default, see ``nas.ops.scan_chunked``), or its closed form over chunks of this many steps.
    Returns ``path``."""
    require_export_packages(("onnx", "onnxscript"))
    H, W = check_exportable(model, img_size)
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, 3, H, W)
        with torch.no_grad():
            model(x)  # the scan tables of this grid, built once outside the trace
            program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        program = program.run_decompositions(export_decompositions(chunk))
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=opset, verbose=False)
        onnx_program.save(path)
    finally:
        model.train(was_training)
    return path


def onnx_logits(path: str, x: torch.Tensor) -> torch.Tensor:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on images x (batch, 3, H, W); logits as a tensor."""
    require_export_packages(("onnxruntime",))
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().float().numpy()})[0])
