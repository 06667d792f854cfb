"""The middle class token is read where it was inserted: at num_patches // 2 (the released rule), on odd,
even and non-square grids."""
import pytest
import torch

from nas.models import create_model


@pytest.mark.parametrize("image", [(28, 28), (16, 16), (12, 20), (20, 12), (16, 24)])  # 7x7, 4x4, 3x5, 5x3, 4x6
@pytest.mark.parametrize("name", ["local_vim_demo", "local_vim_demo_search"])
def test_readout_is_the_class_token(name, image):
    torch.manual_seed(0)
    model = create_model(name, img_size=28, mid_cls_token=True, embed_dim=16).eval()
    with torch.no_grad():
        model.cls_token.normal_()
    x = torch.randn(2, 3, *image)
    n = (image[0] // 4) * (image[1] // 4)
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(first=args[0]) and None)
    model.norm_f.register_forward_hook(lambda m, args, out: seen.update(final=out) and None)
    with torch.no_grad():
        features = model.forward_features(x)
        # inserted at n // 2: the first layer's input there is the class token plus its position embedding
        # (RoPE leaves the class token unrotated)
        pos = model._pos_embed(((image[0] // 4), (image[1] // 4)))
        torch.testing.assert_close(seen["first"][:, n // 2] - pos[n // 2], model.cls_token[0].expand(2, -1))
        # read at n // 2, not at its neighbour
        torch.testing.assert_close(features, seen["final"][:, n // 2], rtol=0, atol=0)
        assert not torch.allclose(features, seen["final"][:, n // 2 + 1])


def test_readout_depends_on_the_class_token():
    torch.manual_seed(0)
    model = create_model("local_vim_demo", img_size=28, mid_cls_token=True, embed_dim=16).eval()
    x = torch.randn(2, 3, 28, 28)  # 49 patches: the class token sits at 24
    with torch.no_grad():
        before = model.forward_features(x)
        model.cls_token.add_(torch.randn_like(model.cls_token))
        after = model.forward_features(x)
    assert (before - after).abs().max() > 1e-3
