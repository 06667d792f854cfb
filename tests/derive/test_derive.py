"""derive.py: arch.yaml from a search run, figures, retraining (scratch and inherited), coinciding scans and
--distinct, stale arch files, damaged run files, bad input."""
import json
import os
import re
import shutil

import pytest
import torch
import yaml

from nas import config as cfglib
from nas.cli.derive import main as derive_main
from nas.cli.derive import parse_args, prepare_retrain
from nas.derive.retrain import build_model
from nas.engine import checkpoint
from nas.models import arch_parameters, create_model
from nas.ops import DIRECTIONS
from nas.search.alphas import AlphaHistory, layer_probs
from nas.cli.search import main as search_main

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "search_spaces", "demo.yaml")
TINY = ["--model_args.depth", "2", "--model_args.embed_dim", "16", "--img_size", "16", "--log.progress", "false"]


@pytest.fixture(scope="module")
def search_runs(tmp_path_factory):
    """One real search of 2 epochs, stopped after the first and resumed: the folder as it was after epoch 1,
    and as it is at the end."""
    base = tmp_path_factory.mktemp("search")
    out = str(base / "run")
    argv = ["-c", DEMO, "--out", out, "--epochs", "2", "--data.images_per_class", "12", "--train.batch_size", "24",
            "--train.warmup_epochs", "0", "--strategy.alpha_lr", "0.1"] + TINY
    assert search_main(argv + ["--train.stop_after_epochs", "1"]) == 0
    shutil.copytree(out, str(base / "after_epoch1"))
    assert search_main(argv) == 0
    return {"after_epoch1": str(base / "after_epoch1"), "final": out}


@pytest.fixture
def search_run(search_runs):
    return search_runs["final"]


def copy_run(search_run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(search_run, dst)
    return dst


def test_derive_writes_top_k_of_the_stored_probabilities(search_run, tmp_path, capsys):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    alphas = [v.view(-1) for k, v in checkpoint.load(os.path.join(run, "last.pt"))["model"].items()
              if k.endswith("multi_scan.weights")]
    probs = torch.stack(alphas).softmax(1)
    assert arch["model"] == "local_vim_demo" and arch["k"] == 4 and len(arch["directions"]) == 2
    for layer, p in zip(arch["directions"], probs):
        want = sorted(p.topk(4).indices.tolist())
        assert layer == [DIRECTIONS[i] for i in want]  # the top 4, in DIRECTIONS order
    torch.testing.assert_close(torch.tensor(arch["probs"], dtype=torch.float64), probs.double(), atol=1e-6, rtol=0)
    printed = capsys.readouterr().out
    assert "directions = [" in printed and "(* = kept" in printed
    for name in ("alphas.png", "alpha_history.png", "scan_orders.png"):
        assert os.path.getsize(os.path.join(run, "figures", name)) > 1000
    first = open(os.path.join(run, "arch.yaml")).read()
    assert derive_main([run]) == 0 and open(os.path.join(run, "arch.yaml")).read() == first  # deterministic


def test_derive_from_alphas_json_alone_and_other_k(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    for name in ("last.pt", "best.pt"):
        os.remove(os.path.join(run, name))
    assert derive_main([run, "-k", "3"]) == 0
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    last = json.load(open(os.path.join(run, "alphas.json")))["epochs"][-1]["probs"]
    for layer, p in zip(arch["directions"], torch.tensor(last)):
        assert layer == [DIRECTIONS[i] for i in sorted(p.topk(3).indices.tolist())]


def test_arch_yaml_round_trips_into_create_model(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    path = os.path.join(run, "arch.yaml")
    arch = yaml.safe_load(open(path))
    model = create_model(arch["model"], directions=path, **arch["model_args"])
    assert [list(d) for d in model.directions] == arch["directions"]


def test_retrain_improves_held_out_accuracy(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run, "--retrain", "--epochs", "2", "--data.images_per_class", "40", "--train.lr", "3e-3",
                        "--train.batch_size", "32", "--train.warmup_epochs", "0", "--train.mixup", "0",
                        "--train.cutmix", "0", "--model_args.drop_path_rate", "0", "--log.progress", "false"]) == 0
    lines = [json.loads(line) for line in open(os.path.join(run, "retrain", "log.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[1]["val_top1"] > lines[0]["val_top1"] and "val_top5" in lines[1]
    assert os.path.isfile(os.path.join(run, "retrain", "last.pt"))


def test_inherit_copies_the_kept_directions(search_run, tmp_path):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    cfg, _ = prepare_retrain(*parse_args([run, "--retrain", "--inherit"]))
    model = build_model(cfg, num_classes=10)
    supernet = checkpoint.load(os.path.join(run, "last.pt"))["model"]
    arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
    for layer, kept in enumerate(arch["directions"]):
        for position, name in enumerate(kept):
            canonical = DIRECTIONS.index(name)
            got = model.state_dict()[f"layers.{layer}.mixer.x_proj_{position}.weight"]
            torch.testing.assert_close(got, supernet[f"layers.{layer}.mixer.x_proj_{canonical}.weight"], rtol=0, atol=0)


def _edit_arch(run, **changes):
    path = os.path.join(run, "arch.yaml")
    arch = yaml.safe_load(open(path))
    arch.update(changes)
    yaml.safe_dump(arch, open(path, "w"))


@pytest.mark.parametrize("case,message", [
    ("empty_folder", "holds no config.yaml, last.pt or alphas.json"),
    ("k0", "-k: expected an int from 1 to 8"),
    ("k9", "-k: expected an int from 1 to 8"),
    ("layers", "expected 2 per-layer lists"),
    ("unknown_direction", "diagonal"),
    ("empty_layer", "directions[0]: expected at least one scan direction per layer, got []"),
    ("unknown_model", "unknown model name 'local_vim_nope'"),
])
def test_bad_input_is_one_line_exit_2(search_run, tmp_path, capsys, case, message):
    run = copy_run(search_run, tmp_path)
    argv = [run]
    if case == "empty_folder":
        argv = [str(tmp_path)]
    elif case in ("k0", "k9"):
        argv = [run, "-k", case[1:]]
    else:
        assert derive_main([run]) == 0
        capsys.readouterr()
        arch = yaml.safe_load(open(os.path.join(run, "arch.yaml")))
        if case == "layers":
            _edit_arch(run, directions=arch["directions"][:1])
        elif case == "unknown_direction":
            _edit_arch(run, directions=[["h", "v", "w2", "diagonal"]] + arch["directions"][1:])
        elif case == "empty_layer":  # written by hand, without k or scans_per_layer
            _edit_arch(run, directions=[[]] + arch["directions"][1:], k=None, model_args={"depth": 2, "embed_dim": 16})
        else:
            _edit_arch(run, model="local_vim_nope")
        argv = [run, "--retrain", "--epochs", "1"]
    assert derive_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("derive.py: error: ") and message in err[0], err


def synthetic_run(folder, model_name, alphas, epoch=3, img_size=28, loop=None, history_alphas=None, **model_args):
    """A search run folder as search.py leaves it (config.yaml, last.pt, alphas.json), with chosen alphas.

    loop: the checkpoint's loop state (default: ``epoch`` finished); history_alphas: the alphas that
    alphas.json records for that epoch (default: ``alphas``; None for the probabilities to match last.pt)."""
    model = create_model(model_name, img_size=img_size, **model_args)

    def set_alphas(rows):
        with torch.no_grad():
            for param, row in zip(arch_parameters(model), rows):
                param.copy_(torch.as_tensor(row, dtype=torch.float32).view_as(param))

    os.makedirs(folder)
    cfglib.save({"model": model_name, "img_size": img_size, "model_args": model_args},
                os.path.join(folder, "config.yaml"))
    history = AlphaHistory()
    if epoch:
        set_alphas(alphas if history_alphas is None else history_alphas)
        history.record(epoch, layer_probs(model))
    history.write(os.path.join(folder, "alphas.json"))
    set_alphas(alphas)
    checkpoint.save({"model": model.state_dict(), "loop": loop or {"epoch": epoch}, "model_name": model_name},
                    os.path.join(folder, "last.pt"))
    return folder


def arch_of(run):
    return yaml.safe_load(open(os.path.join(run, "arch.yaml")))


def table_rows(printed):
    """The per-layer rows of the printed table: [(value text, starred, letter)] per layer."""
    rows = []
    for line in printed.splitlines():
        if re.match(r"^ +\d+ \d\.\d", line):
            rows.append(re.findall(r"(\d\.\d+)([* ])([a-h ]?)", line[6:] + " "))
    return rows


def test_distinct_keeps_k_different_scans_on_a_7x7_grid(tmp_path, capsys):
    # 28 px, patch 4: 7 x 7 tokens, where w7 is h and w7_flip is h_flip
    alphas = [[2.0, 0.0, 1.0, 0.9, 0.8, 0.0, 1.9, 0.0],   # h and its twin w7 lead
              [0.0, 1.0, 0.5, 0.4, 0.3, 0.0, 0.0, 1.0]]   # h_flip and w7_flip tie
    run = synthetic_run(str(tmp_path / "run"), "local_vim_demo_search", alphas, depth=2, embed_dim=16)
    assert derive_main([run]) == 0
    plain = arch_of(run)
    assert plain["directions"] == [["h", "v", "v_flip", "w7"], ["h_flip", "v", "v_flip", "w7_flip"]]
    assert plain["distinct"] is False and plain["epoch"] == 3
    assert plain["coinciding"] == [[["h", "w7"], ["h_flip", "w7_flip"]]] * 2
    rows = table_rows(capsys.readouterr().out)
    assert [letter for _, _, letter in rows[0]] == ["a", "b", " ", " ", " ", " ", "a", "b"]
    assert derive_main([run, "--distinct"]) == 0
    distinct = arch_of(run)
    assert distinct["distinct"] is True and distinct["k"] == 4
    # one name per scan: w7 gives way to h (stronger), w7_flip to h_flip (tie: the lower index)
    assert distinct["directions"] == [["h", "v", "v_flip", "w2"], ["h_flip", "v", "v_flip", "w2"]]
    out = capsys.readouterr().out
    assert "the 4 strongest distinct scans" in out
    model = create_model(distinct["model"], directions=os.path.join(run, "arch.yaml"), **distinct["model_args"])
    assert [list(d) for d in model.directions] == distinct["directions"]


def test_distinct_on_the_small_stages_of_a_hierarchical_model(tmp_path, capsys):
    # 28 px, patch 4: stages of 7, 4, 2, 1 and 1 tokens a side; on one token all 8 scans are the same
    shape = dict(dims=[8, 8, 8, 8, 8], depths=[1, 1, 1, 1, 1], d_state=4)
    alphas = torch.zeros(5, 8)
    alphas[2] = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0])  # 2 x 2: w2 (= h) leads, h second
    alphas[3, 5] = alphas[4, 2] = 1.0
    run = synthetic_run(str(tmp_path / "run"), "local_vssm_demo_search", alphas, **shape)
    assert derive_main([run, "-k", "2", "--distinct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["derive.py: error: --distinct: layer 3 scans a 1 x 1 token grid, on which the 8 candidates are "
                   "1 different scan; -k 2 asks for more"]
    assert not os.path.exists(os.path.join(run, "arch.yaml"))
    assert derive_main([run, "-k", "1", "--distinct"]) == 0
    arch = arch_of(run)
    assert arch["directions"][2:] == [["w2"], ["w2_flip"], ["v"]]
    assert arch["coinciding"][1] == [] and arch["coinciding"][3] == [list(DIRECTIONS)]
    assert derive_main([run, "-k", "2"]) == 0  # plain top-k keeps two names of the one scan
    assert arch_of(run)["directions"][2] == ["h", "w2"]


def test_table_prints_enough_digits_to_tell_kept_from_dropped(tmp_path, capsys):
    alphas = torch.zeros(2, 8)
    alphas[0, :4] = 1e-3
    alphas[0, 4] = 1e-3 - 2e-5  # the 5th is 2.5e-6 below the 4th in probability
    alphas[1, 2:6] = torch.tensor([4e-4, 3e-4, 2e-4, 1e-4])
    run = synthetic_run(str(tmp_path / "run"), "local_vim_demo_search", alphas, depth=2, embed_dim=16)
    assert derive_main([run]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2
    for cells in rows:
        kept = [value for value, star, _ in cells if star == "*"]
        dropped = [value for value, star, _ in cells if star == " "]
        assert min(kept, key=float) != max(dropped, key=float)
        assert float(min(kept, key=float)) > float(max(dropped, key=float))


def test_old_arch_files_still_load_and_are_checked_by_their_probabilities(search_run, tmp_path, capsys):
    run = copy_run(search_run, tmp_path)
    assert derive_main([run]) == 0
    arch = arch_of(run)
    old = {key: arch[key] for key in ("model", "source", "k", "directions", "model_args")}
    old["probs"] = [[round(p, 6) for p in row] for row in arch["probs"]]
    path = os.path.join(run, "arch.yaml")
    yaml.safe_dump(old, open(path, "w"))
    model = create_model(old["model"], directions=path, **old["model_args"])
    assert [list(d) for d in model.directions] == old["directions"]
    cfg, _ = prepare_retrain(*parse_args([run, "--retrain"]))  # its probabilities are the run's latest
    assert cfg["arch"] == os.path.abspath(path)
    old["probs"][0][0] += 0.01
    yaml.safe_dump(old, open(path, "w"))
    capsys.readouterr()
    assert derive_main([run, "--retrain", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "derived before arch files recorded their epoch" in err[0]


def test_retrain_refuses_an_arch_derived_before_the_search_went_on(search_runs, tmp_path, capsys):
    run = copy_run(search_runs["after_epoch1"], tmp_path)
    assert derive_main([run]) == 0
    assert arch_of(run)["epoch"] == 1
    for name in ("last.pt", "best.pt", "alphas.json", "log.jsonl"):  # the search goes on to epoch 2
        shutil.copy(os.path.join(search_runs["final"], name), os.path.join(run, name))
    before = open(os.path.join(run, "arch.yaml")).read()
    capsys.readouterr()
    assert derive_main([run, "--retrain", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"derive.py: error: arch: {run}/arch.yaml holds the top-4 of search epoch 1, but the run's latest "
                   f"alphas are from epoch 2; derive it again (python derive.py {run} -k 4) or delete it, then retrain"]
    assert open(os.path.join(run, "arch.yaml")).read() == before and not os.path.exists(os.path.join(run, "retrain"))
    assert derive_main([run]) == 0 and arch_of(run)["epoch"] == 2
    for argv, message in ((["-k", "3"], "but -k 3 was asked; derive it again (python derive.py RUN -k 3)"),
                          (["--distinct"], "but --distinct was asked; derive it again (python derive.py RUN -k 4 "
                                           "--distinct)")):
        capsys.readouterr()
        assert derive_main([run, "--retrain", "--epochs", "1"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message.replace("RUN", run) in err[0], err
    cfg, _ = prepare_retrain(*parse_args([run, "--retrain", "-k", "4"]))  # current: trained as it is
    assert cfg["arch"] == os.path.abspath(os.path.join(run, "arch.yaml"))


def _damage(run, case):
    if case == "config_yaml":
        with open(os.path.join(run, "config.yaml"), "a") as f:
            f.write("train:\n  lr: [0.1\n  epochs: 3\n")
    elif case == "config_bytes":
        open(os.path.join(run, "config.yaml"), "wb").write(b"model: \xff\xfe\x00oops\n")
    elif case == "config_missing":
        os.remove(os.path.join(run, "config.yaml"))
    elif case == "alphas_json":
        path = os.path.join(run, "alphas.json")
        text = open(path).read()
        open(path, "w").write(text[:40])
    elif case == "alphas_shape":
        json.dump({"directions": list(DIRECTIONS), "epochs": [{"epoch": 1, "probs": [[0.5, 0.5]]}]},
                  open(os.path.join(run, "alphas.json"), "w"))
    elif case == "last_pt":  # and the checkpoints search.py would resume from instead
        for name in ("last.pt", "prev.pt", "best.pt"):
            open(os.path.join(run, name), "wb").write(os.urandom(300))
    elif case == "arch_yaml":
        assert derive_main([run]) == 0
        open(os.path.join(run, "arch.yaml"), "w").write("model: local_vim_demo\ndirections: [[h, v}\n")
    elif case in ("no_epoch", "empty_history"):
        for name in ("last.pt", "best.pt", "alphas.json"):
            os.remove(os.path.join(run, name))
        if case == "empty_history":
            json.dump({"directions": list(DIRECTIONS), "epochs": []}, open(os.path.join(run, "alphas.json"), "w"))


@pytest.mark.parametrize("case,pattern", [
    ("config_yaml", r"run: \S+/config\.yaml line \d+, column \d+: not valid YAML \(.+\)$"),
    ("config_bytes", r"run: cannot read \S+/config\.yaml' \(.*utf-8.*\)$"),
    ("config_missing", r"has no config\.yaml"),
    ("alphas_json", r"run: \S+/alphas\.json is not valid JSON \(line 1, column \d+: .+\)$"),
    ("alphas_shape", r"run: \S+/alphas\.json is not an alphas\.json written by search\.py"),
    ("last_pt", r"run: \S+/last\.pt could not be read as a checkpoint \(damaged.*\), nor prev\.pt or best\.pt; move "
                r"them away to derive from \S+/alphas\.json$"),
    ("arch_yaml", r"arch: \S+/arch\.yaml line 2, column \d+: not valid YAML \(expected ',' or ']'.*\)$"),
    ("no_epoch", r"has no finished search epoch yet"),
    ("empty_history", r"has no finished search epoch yet"),
])
def test_damaged_run_files_are_one_line_errors(search_run, tmp_path, capsys, case, pattern):
    run = copy_run(search_run, tmp_path)
    _damage(run, case)
    capsys.readouterr()
    retrain = [run, "--retrain", "--epochs", "1"]
    for argv in [retrain] if case == "arch_yaml" else [[run], retrain]:  # derive.py RUN writes arch.yaml anew
        assert derive_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("derive.py: error: ") and re.search(pattern, err[0]), err
    assert not os.path.exists(os.path.join(run, "retrain"))


def test_a_run_stopped_inside_an_epoch_is_derived_from_its_last_finished_epoch(tmp_path, capsys):
    epoch1 = torch.zeros(2, 8)
    epoch1[:, :4] = 1.0  # h, h_flip, v, v_flip at the end of epoch 1
    later = torch.zeros(2, 8)
    later[:, 4:] = 1.0  # the window scans lead halfway through epoch 2
    run = synthetic_run(str(tmp_path / "mid"), "local_vim_demo_search", later, epoch=1, loop={"epoch": 1, "batch": 2},
                        history_alphas=epoch1, depth=2, embed_dim=16)
    assert derive_main([run]) == 0
    arch = arch_of(run)
    assert arch["epoch"] == 1 and arch["directions"] == [["h", "h_flip", "v", "v_flip"]] * 2
    run = synthetic_run(str(tmp_path / "first"), "local_vim_demo_search", later, epoch=0, loop={"epoch": 0, "batch": 2},
                        depth=2, embed_dim=16)
    capsys.readouterr()
    assert derive_main([run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no finished search epoch yet" in err[0]
