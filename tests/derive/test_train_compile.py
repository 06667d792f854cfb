"""train.compile: derive.py --retrain trains a torch.compile'd model (one tiny layer: compiling costs tens of
seconds on 2 cores) and its checkpoint holds the bare model's keys, which load into an uncompiled model and
resume without compiling."""
import os

import torch

from nas.cli.derive import main as derive_main
from nas.derive.retrain import build_model
from nas.engine import checkpoint
from nas import config as cfglib
from tests.derive.test_derive import synthetic_run

RETRAIN = ["--retrain", "--data.images_per_class", "4", "--train.batch_size", "20", "--train.warmup_epochs", "0",
           "--train.mixup", "0", "--train.cutmix", "0", "--log.progress", "false", "--log.tensorboard", "false"]


def test_a_compiled_retraining_saves_the_bare_model_and_resumes_uncompiled(tmp_path):
    run = synthetic_run(str(tmp_path / "run"), "local_vim_demo_search", [[0.1 * i for i in range(8)]], img_size=16,
                        depth=1, embed_dim=16)
    assert derive_main([run, "--epochs", "1", "--train.compile", "true", *RETRAIN]) == 0
    out = os.path.join(run, "retrain")
    state = checkpoint.load(os.path.join(out, "last.pt"))["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    cfg = cfglib.load_yaml(os.path.join(out, "config.yaml"), "--out")
    assert cfg["train"]["compile"] is True
    model = build_model(cfg, num_classes=state["head.weight"].shape[0])
    model.load_state_dict(state)  # strict: every key, no prefix
    assert derive_main([run, "--resume", "--epochs", "2", "--train.compile", "false", *RETRAIN]) == 0
    assert checkpoint.load(os.path.join(out, "last.pt"))["loop"]["epoch"] == 2
    assert torch.isfinite(torch.stack([v.float().sum() for v in state.values()])).all()
