"""Forward/backward of every registered model; non-square and odd grids; batched scan == per-direction loop."""
import pytest
import torch
from models_testing import SCAN_BACKEND, small_model

from nas.models import arch_parameters, create_model, list_models, set_batched
from nas.ops import DIRECTIONS, gather_scans, scan_tables, take_steps


def _input(model, H, W, batch=2):
    torch.manual_seed(1)
    return torch.randn(batch, 3, H, W)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_finite(name):
    model = small_model(name)
    size = model.config["img_size"]
    logits = model(_input(model, size, size))
    assert logits.shape == (2, model.num_classes)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    alphas = arch_parameters(model)
    assert bool(alphas) == name.endswith("_search")
    assert all(a.grad.abs().sum() > 0 for a in alphas)


@pytest.mark.parametrize("name,size", [("local_vim_demo_search", (36, 28)), ("local_vssm_demo_search", (64, 48)),
                                       ("local_vim_tiny_middle_cls_token", (40, 24)), ("local_vssm_demo", (44, 20))])
def test_non_square_and_odd_grids_run(name, size):
    model = small_model(name).eval()
    logits = model(_input(model, *size))
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("grid", [(14, 10), (9, 7), (5, 3), (1, 6), (7, 7)])
@pytest.mark.parametrize("cls", [False, True])
def test_scan_tables_undo_exactly(grid, cls):
    H, W = grid
    n_src = H * W + cls
    c = (n_src - 1) // 2 if cls else None
    table, inverse = scan_tables(DIRECTIONS, H, W, torch.device("cpu"), c, trim_leading=not cls)
    x = torch.randn(2, n_src, 5)
    scanned = gather_scans(x, table)  # (2, K, S, 5)
    back = take_steps(scanned.transpose(2, 3), inverse).transpose(2, 3)
    assert torch.equal(back, x[:, None].expand_as(back))
    if cls:  # every scan visits the class token at the same position
        assert torch.equal(scanned[:, :, c], x[:, None, c].expand(2, len(DIRECTIONS), 5))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,size", [("local_vim_demo_search", (28, 28)), ("local_vim_demo", (36, 20)),
                                       ("local_vim_tiny_middle_cls_token", (40, 24)),
                                       ("local_vssm_demo_search", (28, 28)), ("local_vssm_demo", (44, 20))])
def test_batched_scan_equals_per_direction_loop(name, size):
    model = small_model(name)
    x = _input(model, *size)
    out_batched = model(x)
    out_batched.square().mean().backward()
    grads = _grads(model)
    model.zero_grad()
    out_loop = set_batched(model, False)(x)
    out_loop.square().mean().backward()
    torch.testing.assert_close(out_batched, out_loop, rtol=1e-4, atol=1e-5)
    for n, g in _grads(model).items():
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-6, msg=n)


def test_batched_path_makes_one_scan_call_per_layer(monkeypatch):
    import nas.models.ss2d as ss2d
    import nas.models.vim_mixer as vim_mixer
    calls = []
    for module in (ss2d, vim_mixer):
        real = module.multi_direction_scan
        monkeypatch.setattr(module, "multi_direction_scan", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    for name in ("local_vim_demo_search", "local_vssm_demo_search"):
        calls.clear()
        model = create_model(name, backend=SCAN_BACKEND)
        model(torch.randn(1, 3, 28, 28))
        assert len(calls) == len(arch_parameters(model))
