"""Config resolution, the lr schedule, atomic checkpoints and RNG state round trips."""
import os
import random

import numpy as np
import pytest
import torch

from nas import config as cfglib
from nas.engine import checkpoint
from nas.engine.schedule import lr_at

DEFAULTS = {"name": "x", "model_args": {}, "train": {"lr": 1e-3, "epochs": 10, "clip_grad": 5.0},
            "data": {"path": "demo", "classes": None}}


def test_overrides_parse_yaml_values_and_both_spellings():
    over = cfglib.parse_overrides(["--train.lr", "3e-4", "train.epochs=7", "--data.classes", "[a, b]",
                                   "--train.clip_grad", "null", "--model_args.scattn", "full"])
    cfg = cfglib.merge(DEFAULTS, over, "command line")
    assert cfg["train"] == {"lr": 3e-4, "epochs": 7, "clip_grad": None}
    assert cfg["data"]["classes"] == ["a", "b"]
    assert cfg["model_args"] == {"scattn": "full"}
    assert DEFAULTS["train"]["lr"] == 1e-3  # defaults untouched


def test_unknown_key_names_the_key_and_lists_valid_ones(tmp_path):
    with pytest.raises(cfglib.ConfigError, match=r"command line: unknown key 'train\.lrr'; valid keys: .*train\.lr"):
        cfglib.merge(DEFAULTS, cfglib.parse_overrides(["--train.lrr", "1"]), "command line")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  warmup: 3\n")
    with pytest.raises(cfglib.ConfigError, match=f"{path}: unknown key 'train.warmup'"):
        cfglib.resolve(DEFAULTS, str(path), {})


def test_bad_config_files():
    with pytest.raises(cfglib.ConfigError, match="config: file 'nope.yaml' not found"):
        cfglib.resolve(DEFAULTS, "nope.yaml", {})
    with pytest.raises(cfglib.ConfigError, match="expected a value after it"):
        cfglib.parse_overrides(["--train.lr"])


def test_config_saved_and_reloaded(tmp_path):
    cfg = cfglib.merge(DEFAULTS, {"train": {"lr": 0.5}}, "x")
    cfglib.save(cfg, str(tmp_path / "config.yaml"))
    assert cfglib.resolve(DEFAULTS, str(tmp_path / "config.yaml"), {}) == cfg


def test_schedule_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [lr_at(s, total, 1.0, warm, warmup_lr=0.0, min_lr=0.01) for s in range(total + 1)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5)
    assert lrs[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_checkpoint_atomic_and_weights_only(tmp_path):
    path = str(tmp_path / "last.pt")
    checkpoint.save({"w": torch.randn(3), "epoch": 2}, path)
    assert checkpoint.load(path)["epoch"] == 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a checkpoint"):
        checkpoint.load(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="not found"):
        checkpoint.load(str(tmp_path / "none.pt"))


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    checkpoint.save({"rng": checkpoint.rng_state()}, str(tmp_path / "r.pt"))
    first = (torch.rand(3), random.random(), np.random.rand(3))
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path / "r.pt"))["rng"])
    second = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and np.array_equal(first[2], second[2])


def test_free_form_section_filled_by_a_file_still_takes_new_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_args:\n  drop_path_rate: 0.1\n")
    cfg = cfglib.resolve(DEFAULTS, str(path), cfglib.parse_overrides(["--model_args.depth", "2"]))
    assert cfg["model_args"] == {"drop_path_rate": 0.1, "depth": 2}
