"""Checkpoints: round trips, released-file layouts, mismatches, and refusing pickled code."""
import os
import pickle

import pytest
import torch
from models_testing import small_model

from nas.models import create_model, load_checkpoint


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["local_vim_demo", "local_vim_demo_search", "local_vssm_demo_search",
                                  "local_vim_tiny_middle_cls_token"])
def test_save_load_round_trip_gives_identical_logits(name, tmp_path):
    model = small_model(name)
    x = torch.randn(2, 3, 28, 28)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    torch.manual_seed(123)  # a fresh model with other random weights
    fresh = small_model(name)
    fresh.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() else v
                           for k, v in fresh.state_dict().items()})
    assert not torch.equal(_logits(fresh, x), _logits(model, x))
    load_checkpoint(fresh, path)
    assert torch.equal(_logits(fresh, x), _logits(model, x))


def test_released_layouts_state_dict_wrapper_and_module_prefix(tmp_path):
    model = small_model("local_vssm_demo")
    x = torch.randn(1, 3, 28, 28)
    ddp_style = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(ddp_style, tmp_path / "released.pth")
    fresh = create_model("local_vssm_demo")
    load_checkpoint(fresh, os.fspath(tmp_path / "released.pth"))
    assert torch.equal(_logits(fresh, x), _logits(model, x))
    raw = create_model("local_vssm_demo")
    load_checkpoint(raw, model.state_dict())  # a raw state_dict object works too
    assert torch.equal(_logits(raw, x), _logits(model, x))


def test_supernet_checkpoint_into_derived_model_names_the_keys():
    supernet = create_model("local_vim_demo_search")
    with pytest.raises(ValueError, match=r"checkpoint: does not fit local_vim_demo: .*not in the model: "
                                         r".*(A_log_4|multi_scan\.weights)"):
        load_checkpoint(create_model("local_vim_demo"), supernet.state_dict())


def test_shape_and_missing_key_mismatches():
    state = create_model("local_vssm_demo", num_classes=5).state_dict()
    with pytest.raises(ValueError, match=r"another shape: classifier\.head\.weight \(checkpoint \(5, 128\), "
                                         r"model \(10, 128\)\)"):
        load_checkpoint(create_model("local_vssm_demo"), state)
    del state["classifier.norm.bias"]
    with pytest.raises(ValueError, match=r"missing from the checkpoint: classifier\.norm\.bias"):
        load_checkpoint(create_model("local_vssm_demo", num_classes=5), state)
    message = None
    try:
        load_checkpoint(create_model("local_vssm_demo"), state)
    except ValueError as err:
        message = str(err)
    assert message is not None and "\n" not in message


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/should-never-exist-nas-models-test",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode()}, f, protocol=2)
    with pytest.raises(ValueError, match="checkpoint: .*refuse"):
        load_checkpoint(create_model("local_vim_demo"), path)
    assert not os.path.exists("/tmp/should-never-exist-nas-models-test")


def test_not_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint: file .* not found"):
        load_checkpoint(create_model("local_vim_demo"), "/nonexistent/ckpt.pth")
    with pytest.raises(ValueError, match="checkpoint: expected a state_dict"):
        load_checkpoint(create_model("local_vim_demo"), [1, 2])
