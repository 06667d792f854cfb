"""Sampled search: only the active directions of each layer run, merged by renormalized softmax(alpha)."""
import copy

import pytest
import torch
from models_testing import SCAN_BACKEND

from nas.models import arch_parameters, create_model, set_active_paths, set_batched

ACTIVE = [[0, 3, 5, 6], [1, 2, 4, 7], [2, 3, 6, 7], [0, 1, 4, 5]]


@pytest.mark.parametrize("name", ["local_vim_demo_search", "local_vssm_demo_search"])
def test_active_paths_equal_the_supernet_with_the_others_masked(name):
    torch.manual_seed(0)
    model = create_model(name, backend=SCAN_BACKEND).eval()
    with torch.no_grad():
        for a in arch_parameters(model):
            a.normal_()
    masked = copy.deepcopy(model)
    with torch.no_grad():  # alpha -1e4 outside the active set: softmax renormalized over the active paths
        for a, active in zip(arch_parameters(masked), ACTIVE):
            keep = a[active].clone()
            a.fill_(-1e4)
            a[active] = keep
    x = torch.randn(2, 3, 28, 28)
    set_active_paths(model, [torch.tensor(p) for p in ACTIVE])
    out = model(x)
    torch.testing.assert_close(out, masked(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, set_batched(copy.deepcopy(model), False)(x), rtol=1e-4, atol=1e-5)
    set_active_paths(model, None)
    assert not torch.allclose(model(x), out)


def test_inactive_scans_skip_but_every_alpha_gets_a_gradient():
    torch.manual_seed(0)
    model = create_model("local_vim_demo_search", backend=SCAN_BACKEND)
    set_active_paths(model, ACTIVE)
    model(torch.randn(2, 3, 28, 28)).square().mean().backward()
    for a in arch_parameters(model):
        assert (a.grad.view(-1) != 0).all()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["layers.0.mixer.x_proj_3.weight"] is not None and grads["layers.0.mixer.x_proj_1.weight"] is None
    vssm = create_model("local_vssm_demo_search", backend=SCAN_BACKEND)
    set_active_paths(vssm, ACTIVE)
    vssm(torch.randn(2, 3, 28, 28)).square().mean().backward()
    g = vssm.layers[0].blocks[0].op.x_proj_weight.grad
    assert g[[1, 2, 4, 7]].abs().sum() == 0 and g[[0, 3, 5, 6]].abs().sum() > 0


def test_bad_paths():
    model = create_model("local_vim_demo_search")
    with pytest.raises(ValueError, match=r"paths: expected one index list per searchable layer \(4\), got 3"):
        set_active_paths(model, ACTIVE[:3])
    with pytest.raises(ValueError, match=r"paths\[1\]: expected distinct direction indices in 0\.\.7, got \[1, 1\]"):
        set_active_paths(model, [[0], [1, 1], [2], [3]])
    with pytest.raises(ValueError, match=r"paths\[0\]: .* got \[8\]"):
        set_active_paths(model, [[8], [1], [2], [3]])
