"""Config resolution and checks, the lr schedule, atomic checkpoints and RNG state round trips."""
import os
import random

import numpy as np
import pytest
import torch

from nas import config as cfglib
from nas.engine import checkpoint
from nas.engine.loop import TRAIN_DEFAULTS
from nas.engine.schedule import lr_at
from nas.engine.settings import TRAIN_CHECKS, check_train

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


def test_unknown_key_suggests_the_closest_valid_keys(tmp_path):
    def message(*tokens):
        with pytest.raises(cfglib.ConfigError) as info:
            cfglib.merge(DEFAULTS, cfglib.parse_overrides(list(tokens)), "command line")
        return str(info.value)
    assert message("--train.lrr", "1") == "command line: unknown key 'train.lrr'; did you mean 'train.lr'?"
    assert message("--lr", "1") == "command line: unknown key 'lr'; did you mean 'train.lr'?"
    assert message("--train.epoch", "3") == "command line: unknown key 'train.epoch'; did you mean 'train.epochs'?"
    assert message("--nothing.like.it", "1") == ("command line: unknown key 'nothing.like.it'; the top-level keys "
                                                 "are data, model_args, name, train")
    assert "train is a section, not a value (got 5); set its keys, e.g. train.lr" in message("--train", "5")
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  warmup: 3\n")
    with pytest.raises(cfglib.ConfigError, match=f"{path}: unknown key 'train.warmup'"):
        cfglib.resolve(DEFAULTS, str(path), {})


def test_yaml_errors_give_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  lr: 1\n    epochs: 3\n")
    with pytest.raises(cfglib.ConfigError) as info:
        cfglib.load_yaml(str(path))
    assert str(info.value).startswith(f"config: {path} line 4, column 11: not valid YAML (mapping values are not "
                                      f"allowed here")
    path.write_text("[1, 2\n")
    with pytest.raises(cfglib.ConfigError, match=r"line 2, column 1: not valid YAML"):
        cfglib.load_yaml(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(cfglib.ConfigError, match="must hold a mapping of keys, got list"):
        cfglib.load_yaml(str(path))


def test_config_found_by_search_space_name(tmp_path):
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "tiny.yaml").write_text("name: tiny\n")
    (spaces / "big.yaml").write_text("name: big\n")
    assert cfglib.find_config("tiny", str(spaces)) == str(spaces / "tiny.yaml")
    assert cfglib.find_config("tiny.yaml", str(spaces)) == str(spaces / "tiny.yaml")
    own = tmp_path / "own.yaml"
    own.write_text("name: own\n")
    assert cfglib.find_config(str(own), str(spaces)) == str(own)
    with pytest.raises(cfglib.ConfigError, match=r"-c: 'huge' is neither a config file nor a search space "
                                                 r"\(search spaces: big, tiny\)"):
        cfglib.find_config("huge", str(spaces))


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


def test_checkpoint_atomic_keeps_the_previous_one_and_reads_only_weights(tmp_path):
    path = str(tmp_path / "last.pt")
    checkpoint.save({"w": torch.randn(3), "epoch": 1}, path, keep_previous=True)
    assert not os.path.exists(tmp_path / "prev.pt")  # nothing to keep yet
    checkpoint.save({"w": torch.randn(3), "epoch": 2}, path, keep_previous=True)
    assert checkpoint.load(path)["epoch"] == 2 and checkpoint.load(str(tmp_path / "prev.pt"))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "prev.pt"]  # no temporary file left
    assert os.stat(path).st_mode & 0o777 == 0o644 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("content,reason", [
    (b"", "the file is empty"),
    (b"not a checkpoint", "damaged, truncated or not a checkpoint: UnpicklingError"),
    (None, "damaged, truncated or not a checkpoint"),  # a real checkpoint cut in half
])
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    if content is None:
        checkpoint.save({"w": torch.randn(1000)}, str(path))
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(path))
    assert str(info.value).startswith(f"checkpoint: {path} could not be read ({reason}")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_checkpoint_must_hold_the_keys_asked_for(tmp_path):
    checkpoint.save({"model": {}}, str(tmp_path / "c.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="is not a run checkpoint \\(no loop, rng\\)"):
        checkpoint.load(str(tmp_path / "c.pt"), ("model", "loop", "rng"))
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
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


def test_every_train_key_has_a_check_and_the_defaults_pass():
    assert set(TRAIN_CHECKS) == set(TRAIN_DEFAULTS)
    check_train(dict(TRAIN_DEFAULTS))


@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "abc", "an int >= 1"), ("epochs", 2.5, "an int >= 1"), ("epochs", 0, "an int >= 1"),
    ("epochs", True, "an int >= 1"), ("lr", -1, "a number > 0"), ("lr", "abc", "a number > 0"),
    ("lr", float("nan"), "a number > 0"), ("workers", -1, "an int >= 0"),
    ("label_smoothing", "abc", "a number >= 0 and < 1"), ("label_smoothing", 1.0, "a number >= 0 and < 1"),
    ("amp", "fp16", "one of auto, bf16, none"), ("device", "gpu", "auto, cpu, cuda or cuda:N"),
    ("clip_grad", -1, "a number >= 0 or null (no clipping)"), ("batch_size", 0, "an int >= 1"),
    ("stop_after_epochs", 0, "an int >= 1 or null (run to train.epochs)"),
])
def test_bad_train_values_name_the_key_what_was_expected_and_what_came(key, value, expected):
    with pytest.raises(cfglib.ConfigError) as info:
        check_train({**TRAIN_DEFAULTS, key: value})
    assert str(info.value) == f"train.{key}: expected {expected}, got {value!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_up_front():
    with pytest.raises(cfglib.ConfigError, match="train.device: 'cuda' was asked for but this machine has no CUDA"):
        check_train({**TRAIN_DEFAULTS, "device": "cuda"})


def test_an_unknown_key_in_a_known_section_lists_that_sections_keys():
    with pytest.raises(cfglib.ConfigError) as info:
        cfglib.merge(DEFAULTS, cfglib.parse_overrides(["--train.learning_rate", "1"]), "command line")
    assert str(info.value) == ("command line: unknown key 'train.learning_rate'; the keys of train are clip_grad, "
                               "epochs, lr")


@pytest.mark.parametrize("launched, expected", [
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, "gloo 1 rank 0"),  # torchrun --nproc_per_node 1
    ({}, "no group"),  # plain python
])
def test_a_one_process_torchrun_forms_its_process_group(launched, expected):
    """torchrun with one process joins a group (so its collectives run as in a larger job); without torchrun's
    variables nothing is joined."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(launched, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = ("import torch.distributed as dist\nfrom nas.engine.distributed import setup, teardown\n"
            "env = setup('cpu')\n"
            "print(f'{dist.get_backend()} {dist.get_world_size()} rank {env.rank}' if dist.is_initialized() "
            "else 'no group')\nteardown()")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == expected
