"""torch.compile(model, fullgraph=True) of every registered model: one graph (fullgraph raises at any graph
break), forward and backward, the same logits and gradients as eager. Tiny variants of each (one or two layers,
narrow widths, a non-square odd grid), so that compiling stays cheap on 2 cores: every model captured by Dynamo
(what breaks a graph shows there), one model of each family through AOTAutograd (the operators' fake
implementations and registered autograd), and one through Inductor, the compiler users run; and the PyTorch
scan and conv that run where no C compiler is, through AOTAutograd. fp32 tolerances: rtol 1e-4, atol 1e-5
(Inductor fuses and reorders the elementwise math)."""
import pytest
import torch

from nas.models import list_models
from nas.models.registry import model_spec
from nas.ops import cpu_kernels
from nas.ops.selective_scan import resolve_backend
from tests.models.models_testing import small_model


def tiny_model(name: str):
    """The registered variant at its layout, one or two layers deep, narrow, on a 3 x 2 (LocalVim) or 3 x 5
    then 2 x 3 (LocalVMamba) token grid."""
    spec = model_spec(name)
    if name.startswith("local_vim"):
        overrides = dict(img_size=(12, 20) if "cls" in name else (12, 8), patch_size=4, embed_dim=16, depth=1)
        layers = 1
    else:
        overrides = dict(img_size=(12, 20), dims=[8, 16], depths=[1, 1])
        layers = 2
    if not spec.search:
        overrides["directions"] = spec.default_directions()[:layers]
    return small_model(name, num_classes=5, drop_path_rate=0.0, **overrides)


def run(model, forward, x, w):
    """Logits and the gradient of every parameter of ``model`` for the loss <forward(x), w>."""
    model.zero_grad(set_to_none=True)
    logits = forward(x)
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *model.config["img_size"], generator=g)
    w = torch.randn(2, 5, generator=g)
    want, want_grads = run(model, model, x, w)
    got, got_grads = run(model, torch.compile(model, backend=backend, fullgraph=True), x, w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) == len(list(model.parameters()))
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_is_one_graph_forward_and_backward(name):
    assert_same(tiny_model(name), "eager")


@pytest.mark.parametrize("name", ["local_vim_demo_search", "local_vssm_demo"])
def test_aot_autograd_traces_the_registered_ops_forward_and_backward(name):
    assert_same(tiny_model(name), "aot_eager")


def test_inductor_gives_the_eager_numbers():
    assert_same(tiny_model("local_vim_demo_search"), "inductor")


def autograd_nodes(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [f for f, _ in node.next_functions]
    return {node.name() for node in seen}


def test_without_a_compiler_the_pytorch_scan_and_conv_are_one_graph(monkeypatch):
    """Where no C compiler is, 'auto' runs the PyTorch scan (``scan_torch``) and PyTorch's conv: that path
    compiles as one graph too, through AOTAutograd (its hand-written backward traced). One family: the other
    reaches the same scan through the same call. Directions without pads keep the sequence short (6 tokens):
    the scan's loops over time steps are unrolled into the graph."""
    monkeypatch.setattr(cpu_kernels, "library", lambda: (None, "no C compiler (test)"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    model = small_model("local_vim_demo", num_classes=5, drop_path_rate=0.0, img_size=(12, 8), patch_size=4,
                        embed_dim=16, depth=1, directions=[["h", "h_flip", "v", "v_flip"]])
    nodes = autograd_nodes(model(torch.randn(1, 3, *model.config["img_size"])))
    assert "SelectiveScanFnBackward" in nodes and not any("nas_" in n for n in nodes), nodes
    assert_same(model, "aot_eager")
