"""Alpha, derivation, parameter groups, SCAttn and the merge."""
import pytest
import torch
import torch.nn.functional as F

from nas.models import (SCAttn, arch_parameters, create_model, derive_directions, split_parameters)
from nas.models.mixed_scan import MultiScan
from nas.ops import DIRECTIONS


def test_arch_parameters_in_layer_order():
    model = create_model("local_vssm_demo_search")
    alphas = arch_parameters(model)
    names = [n for n, _ in model.named_parameters() if n.endswith("multi_scan.weights")]
    assert len(alphas) == model.num_layers == len(names) == 4
    params = dict(model.named_parameters())
    assert all(a is params[n] for a, n in zip(alphas, names))
    assert all(a.shape == (8, 1, 1, 1) and a.requires_grad and a.abs().max() < 0.01 for a in alphas)
    assert arch_parameters(create_model("local_vssm_demo")) == []


def test_split_parameters_separates_alphas():
    model = create_model("local_vim_demo_search")
    weights, alphas = split_parameters(model)
    assert {id(p) for p in weights}.isdisjoint(id(a) for a in alphas)
    assert len(weights) + len(alphas) == len(list(model.parameters()))
    torch.optim.AdamW([{"params": weights}, {"params": alphas, "weight_decay": 0.0}])


def test_derive_directions_top_k_in_canonical_order():
    alphas = [torch.tensor([0.1, 0.9, 0.3, 0.8, -1.0, 0.7, 0.0, 0.2]),
              torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0])]
    assert derive_directions(alphas) == [["h_flip", "v", "v_flip", "w2_flip"], ["h", "h_flip", "v", "w7_flip"]]
    assert derive_directions(torch.stack(alphas), k=2) == [["h_flip", "v_flip"], ["h", "w7_flip"]]
    assert derive_directions([torch.zeros(8, 1, 1, 1)], k=3) == [["h", "h_flip", "v"]]  # ties: lower index


def test_derive_directions_from_a_model():
    model = create_model("local_vim_demo_search")
    with torch.no_grad():
        for i, a in enumerate(arch_parameters(model)):
            a.copy_(torch.arange(8.0).flip(0).roll(i).view(8, 1, 1, 1))
    derived = derive_directions(model)
    assert derived[0] == ["h", "h_flip", "v", "v_flip"]
    assert derived[1] == ["h_flip", "v", "v_flip", "w2"]
    assert all(layer == sorted(layer, key=DIRECTIONS.index) for layer in derived)
    assert create_model("local_vim_demo", directions=derived).directions == derived


def test_derive_directions_bad_input():
    with pytest.raises(ValueError, match=r"k: expected an int from 1 to 8, got 9"):
        derive_directions([torch.zeros(8)], k=9)
    with pytest.raises(ValueError, match=r"alphas\[0\]: expected 8 values"):
        derive_directions([torch.zeros(5)])
    with pytest.raises(ValueError, match=r"local_vim_demo has no alpha parameters"):
        derive_directions(create_model("local_vim_demo"))


def test_search_merge_is_softmax_weighted_layer_norms():
    scan = MultiScan(6)
    ys = torch.randn(2, 8, 5, 6) * 3 + 1
    w = scan.weights.view(-1).softmax(0)
    want = sum(w[k] * F.layer_norm(ys[:, k], (6,)) for k in range(8))
    torch.testing.assert_close(scan.merge(ys), want)
    derived = MultiScan(6, ["h", "v", "w2", "w7"])
    assert not hasattr(derived, "weights")
    torch.testing.assert_close(derived.merge(ys[:, :4]), ys[:, :4].sum(1))


def test_scattn_channel_and_full():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 16)
    attn = SCAttn(16)
    normed = F.layer_norm(x, (16,), attn.norm.weight, attn.norm.bias)
    g = F.gelu(attn.global_reduce(normed.mean(1, keepdim=True)))
    channel = torch.sigmoid(attn.channel_select(g))
    torch.testing.assert_close(attn(x), x * channel)
    full = SCAttn(16, "full")
    full.load_state_dict(attn.state_dict(), strict=False)
    local = F.gelu(full.local_reduce(normed))
    spatial = torch.sigmoid(full.spatial_select(torch.cat([local, g.expand(-1, 10, -1)], -1)))
    torch.testing.assert_close(full(x), x * channel * spatial)
    # one call over stacked directions == one call per direction
    xs = torch.randn(2, 4, 10, 16)
    torch.testing.assert_close(full(xs), torch.stack([full(xs[:, k]) for k in range(4)], 1))
