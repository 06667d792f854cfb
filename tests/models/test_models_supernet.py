"""A supernet whose alpha favours four directions equals the derived model with those paths' weights.

The documented merge difference: the supernet merges ``sum_k softmax(alpha)_k * LN_k(y_k)`` (LN_k
without affine parameters), the derived model ``sum_k y_k``. With alpha forcing 1/4 on the chosen
four, the supernet equals the derived model with its merge replaced by ``1/4 * sum_k LN(y_k)``; with
the LN switched to identity and the weights to one-hot-ish 0/1, it equals the derived model itself.
"""
import pytest
import torch
import torch.nn as nn
from models_testing import SCAN_BACKEND

from nas.models import create_model, derived_from_supernet
from nas.models.mixed_scan import MultiScan
from nas.ops import DIRECTIONS

CASES = [("local_vim_demo_search", "local_vim_demo", (28, 28)), ("local_vssm_demo_search", "local_vssm_demo", (36, 28))]


def _chosen(num_layers):
    g = torch.Generator().manual_seed(3)
    return [sorted(torch.randperm(8, generator=g)[:4].tolist()) for _ in range(num_layers)]


def _force_alpha(supernet, chosen):
    scans = [m for m in supernet.modules() if isinstance(m, MultiScan)]
    with torch.no_grad():
        for m, idx in zip(scans, chosen):
            m.weights.fill_(-1e4)  # exp(-1e4) == 0 in fp32: the other paths get exactly zero weight
            m.weights[idx] = 0.0
    return [[DIRECTIONS[i] for i in idx] for idx in chosen]


def _pair(search_name, derived_name):
    torch.manual_seed(0)
    supernet = create_model(search_name, backend=SCAN_BACKEND).eval()
    directions = _force_alpha(supernet, _chosen(supernet.num_layers))
    derived = derived_from_supernet(supernet, derived_name, directions).eval()
    return supernet, derived, directions


@pytest.mark.parametrize("search_name,derived_name,size", CASES)
def test_supernet_equals_derived_up_to_the_merge(search_name, derived_name, size):
    supernet, derived, directions = _pair(search_name, derived_name)
    assert derived.directions == directions
    x = torch.randn(2, 3, *size)
    ln_quarter = lambda self, ys: 0.25 * nn.functional.layer_norm(ys, ys.shape[-1:]).sum(1)  # noqa: E731
    with torch.no_grad():
        out = supernet(x)
        for m in derived.modules():
            if isinstance(m, MultiScan):
                m.merge = ln_quarter.__get__(m)
        torch.testing.assert_close(out, derived(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("search_name,derived_name,size", CASES)
def test_supernet_equals_derived_exactly_without_the_merge_difference(search_name, derived_name, size):
    supernet, derived, directions = _pair(search_name, derived_name)
    for m, dirs in zip([m for m in supernet.modules() if isinstance(m, MultiScan)], directions):
        m.norm = nn.Identity()
        mask = torch.tensor([float(d in dirs) for d in DIRECTIONS])
        m.path_weights = lambda mask=mask: mask
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(supernet(x), derived(x), rtol=1e-5, atol=1e-6)


def test_inherited_weights_sit_at_their_list_positions():
    supernet, derived, directions = _pair("local_vim_demo_search", "local_vim_demo")
    s, d = supernet.state_dict(), derived.state_dict()
    for i, layer_dirs in enumerate(directions):
        for k, name in enumerate(layer_dirs):
            j = DIRECTIONS.index(name)
            for key in ("A_log_{}", "D_{}", "conv1d_{}.weight", "x_proj_{}.weight", "dt_proj_{}.bias"):
                assert torch.equal(d[f"layers.{i}.mixer." + key.format(k)], s[f"layers.{i}.mixer." + key.format(j)])
    supernet, derived, directions = _pair("local_vssm_demo_search", "local_vssm_demo")
    s, d = supernet.state_dict(), derived.state_dict()
    op = "layers.1.blocks.1.op."
    idx = [DIRECTIONS.index(n) for n in directions[2]]
    Di = derived.layers[1].blocks[1].op.d_inner
    assert torch.equal(d[op + "x_proj_weight"], s[op + "x_proj_weight"][idx])
    assert torch.equal(d[op + "A_logs"].view(4, Di, -1), s[op + "A_logs"].view(8, Di, -1)[idx])
    assert torch.equal(d[op + "Ds"].view(4, Di), s[op + "Ds"].view(8, Di)[idx])


def test_derived_from_supernet_defaults_and_state_input():
    supernet, _, directions = _pair("local_vim_demo_search", "local_vim_demo")
    own = derived_from_supernet(supernet)  # the supernet's own architecture, top-4 of its alpha
    assert own.directions == directions and own.config["embed_dim"] == supernet.config["embed_dim"]
    from_state = derived_from_supernet({"model": supernet.state_dict()}, "local_vim_demo")
    assert from_state.directions == directions
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(own.eval()(x), from_state.eval()(x))


def test_derived_from_supernet_rejects_other_widths():
    supernet, _, directions = _pair("local_vim_demo_search", "local_vim_demo")
    with pytest.raises(ValueError, match=r"supernet: cannot fill .*widths"):
        derived_from_supernet(supernet, "local_vim_demo", directions, embed_dim=64)
