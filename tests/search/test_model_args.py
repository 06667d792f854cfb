"""The hostile list of model settings, the way a user types them: each is one line (exit 2) before any data is
read or a folder written; two options that a search sets itself say where to set them."""
import os
import subprocess
import sys

import pytest

from nas.cli.search import main, parse_args, resolve_config
from nas.errors import UserError
from nas.models import settings
from test_run_safety import SEARCH, _error_line

BASE = ["--data.images_per_class", "12", "--epochs", "1"]


@pytest.mark.parametrize("argv,message", [
    (["--model_args.num_classes", "3"], "model_args.num_classes: a search's head has one output per class of its "
                                        "data; choose --data.num_classes 3 (or data.classes)"),
    (["--model_args.img_size", "64"], "model_args.img_size: a search's image size is img_size; pass --img_size 64"),
    (["--model_args.depth", "-1"], "model_args.depth: expected an int >= 1, got -1"),
    (["--model_args.depth", "2.5"], "model_args.depth: expected an int >= 1, got 2.5"),
    (["--model_args.depth", "0"], "model_args.depth: expected an int >= 1, got 0"),
    (["--model_args.patch_size", "0"], "model_args.patch_size: expected an int >= 1, got 0"),
    (["--model_args.expand", "0"], "model_args.expand: expected an int >= 1, got 0"),
    (["--model_args.scattn", "bogus"], "model_args.scattn: expected one of channel, full, got 'bogus'"),
    (["--model_args.drop_path_rate", "2"], "model_args.drop_path_rate: expected a number >= 0 and < 1, got 2"),
    (["--model_args.d_state", "0"], "model_args.d_state: expected an int >= 1, got 0"),
    (["--model_args.scans_per_layer", "2"], "model_args.scans_per_layer: local_vim_demo_search is a search model, "
                                            "which runs all its candidates in every layer; scans_per_layer is the "
                                            "number of directions of a derived model (a search chooses how many to "
                                            "keep with strategy.k)"),
    (["--data.num_classes", "1"], "data.num_classes: expected an int >= 2 (a search learns from telling classes "
                                  "apart), got 1"),
    (["--model_args.candidates", "[h, v]"], "model_args.candidates: name a search space's candidates under "
                                            "search.candidates"),
    (["--model_args.colour", "red"], "model_args.colour: not an option of local_vim_demo_search; expected one of "
                                     "patch_size, in_chans, embed_dim, depth, d_state, expand, drop_path_rate, "
                                     "mid_cls_token, rope, pt_seq_len, scattn, backend"),
])
def test_each_bad_model_setting_is_one_line_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(BASE + ["--out", str(out)] + argv) == 2
    assert _error_line(capsys) == message
    assert not out.exists()


def test_an_image_size_that_cannot_fit_is_one_line_in_a_real_process(tmp_path):
    """Was an allocator traceback (4.8 TB) while the demo images were being resized."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, SEARCH, *BASE, "--out", str(out), "--img_size", "100000"],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(SEARCH))
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.startswith("search.py: error: img_size: 100000 x 100000 images make 625,000,000 tokens per "
                                  "layer of local_vim_demo_search, whose activations for one training step of 64 "
                                  "images need at least ")
    assert done.stderr.strip().endswith("expected a smaller img_size or batch size")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_memory_bound_counts_the_directions_a_strategy_runs(tmp_path, monkeypatch):
    """At 1000 x 1000 (62,500 tokens) and 64 images, 8 directions per layer need at least 49 GB, a sampled
    search of 1 direction a step 6.1 GB: on a 10 GB machine only the first is refused."""
    monkeypatch.setattr(settings, "machine_memory", lambda device: (10 * 10**9, "this machine has"))
    argv = BASE + ["--out", str(tmp_path / "run"), "--img_size", "1000"]
    with pytest.raises(UserError, match=r"^img_size: 1000 x 1000 images .* need at least 49\.2 GB; this machine "
                                        r"has 10\.0 GB"):
        resolve_config(*parse_args(argv))
    cfg, _ = resolve_config(*parse_args(argv + ["--strategy.name", "sampled", "--strategy.k", "1"]))
    assert cfg["img_size"] == 1000
