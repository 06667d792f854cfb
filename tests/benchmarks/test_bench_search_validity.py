"""The search-validity benchmark: its expected sets against the scan-order contract, and the small version
(one task, one strategy; a task over LocalMamba's 8 and the planted one over new orders) end to end on real PNG
files, checking the recovered set and the premise."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from nas.ops import DIRECTIONS, registered_scans, scan_order  # noqa: E402
from nas.ops.directions import coinciding_directions  # noqa: E402
from nas.tune.baselines import FIXED  # noqa: E402
from validity_tasks import (BITS, COLOURS, PAIRS, PLANTED, TASKS, expected_directions, pair_directions,  # noqa: E402
                            task_image)

REACH = 3  # LocalVimMixer's causal conv1d has width 4: it hands the 3 steps before a token to it


def carriers_by_scan_order(cells, grid, candidates=DIRECTIONS):
    """Candidates that scan every cell of R before position n // 2 (where the class token goes) and one of
    them among the last REACH positions before it: read from ``scan_order`` itself, padding included."""
    out = []
    for d in candidates:
        order = scan_order(d, grid, grid).tolist()
        positions = [order.index(r * grid + c) for r, c in cells]
        if all(p < grid * grid // 2 for p in positions) and any(p >= grid * grid // 2 - REACH for p in positions):
            out.append(d)
    return out


def test_expected_sets_follow_the_scan_orders():
    sets = [expected_directions(t.cells, t.grid, REACH) for t in TASKS]
    assert sets == [carriers_by_scan_order(t.cells, t.grid) for t in TASKS]
    assert sorted(len(s) for s in sets) == [3, 3, 4]
    assert len({tuple(s) for s in sets}) == len(TASKS)  # every task asks for another set


def test_the_planted_answer_is_new_orders_only():
    (task,) = PLANTED
    expected = expected_directions(task.cells, task.grid, REACH, task.candidates)
    assert expected == carriers_by_scan_order(task.cells, task.grid, task.candidates) == ["hilbert", "w4"]
    assert expected_directions(task.cells, task.grid, REACH) == []  # no LocalMamba direction sees R at all
    with pytest.raises(ValueError, match=r"spiral_flip sees R, but no token of R lies in its last 3 steps"):
        expected_directions(task.cells, task.grid, REACH, registered_scans())  # why spiral_flip is left out
    assert coinciding_directions(task.grid, task.grid, candidates=task.candidates) == ()


def test_each_bit_of_a_pair_task_is_near_one_direction_only_and_the_pair_is_not_the_fixed_set():
    answers = []
    for task in PAIRS:
        expected = pair_directions(task.cells, task.grid, REACH)
        # per token, from scan_order itself: the candidates with it among the last REACH steps before n // 2
        near = [[d for d in DIRECTIONS if grid_near(d, task.grid, cell)] for cell in task.cells]
        assert all(len(n) == 1 for n in near) and expected == [d for d in DIRECTIONS if [d] in near]
        assert len(expected) == 2 and not set(expected) <= set(FIXED)
        answers.append(expected)
    assert len({tuple(a) for a in answers}) == len(PAIRS)
    with pytest.raises(ValueError, match=r"within the last 3 steps of 4 candidates \(h, v_flip, w2, w7\)"):
        pair_directions(((2, 3),), 6, REACH)  # the single-token task's R: one token, four carriers


def grid_near(direction, grid, cell):
    order = scan_order(direction, grid, grid).tolist()
    return grid * grid // 2 - REACH <= order.index(cell[0] * grid + cell[1]) < grid * grid // 2


def test_a_pair_task_writes_one_bit_per_token_of_r():
    task = PAIRS[0]
    assert list(task.classes) == sorted(task.classes) == ["_".join(c) for c in itertools.product(BITS, BITS)]
    rng = np.random.default_rng(0)
    for label, colours in task.classes.items():
        pixels = np.asarray(task_image(task, label, rng), dtype=float)
        for (r, c), rgb in zip(task.cells, colours):
            patch = pixels[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].reshape(-1, 3).mean(0)
            assert np.abs(patch - rgb).max() < 30, (label, r, c)  # pixel noise of std 25 over 16 pixels


def test_every_task_has_eight_candidates_with_the_fixed_baseline_among_them():
    for task in TASKS + PLANTED + PAIRS:
        assert len(task.candidates) == 8 and set(FIXED) <= set(task.candidates)


def test_partial_or_distant_regions_are_refused():
    with pytest.raises(ValueError, match=r"h sees 1 of the 2 tokens of R"):
        expected_directions(((2, 3), (3, 2)), 6, REACH)  # two tokens that different directions see
    with pytest.raises(ValueError, match=r"no token of R lies in its last 3 steps"):
        expected_directions(((0, 0),), 6, REACH)  # seen by h, but 18 steps before the class token


@pytest.mark.parametrize("task", [next(t for t in TASKS if t.grid == 4), PLANTED[0]], ids=lambda t: t.name)
def test_one_task_one_strategy(task, tmp_path):
    out = tmp_path / "record.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_search_validity.py"), "--tasks", task.name,
                           "--strategies", "joint", "--search-seeds", "0", "--retrain-seeds", "0",
                           "--train-per-class", "64", "--val-per-class", "32", "--work", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted((tmp_path / "work" / task.name / "data" / "train").glob("*/*.png"))  # what the search read
    assert len(images) == 64 * len(COLOURS)
    with Image.open(images[0]) as img:
        assert img.size == (task.img_size, task.img_size) and img.mode == "RGB"

    record = json.loads(out.read_text())
    assert record["environment"]["torch"] and record["settings"]["conv_reach"] == REACH
    (result,) = record["tasks"]
    expected = expected_directions(task.cells, task.grid, REACH, task.candidates)
    assert result["expected"] == expected and result["search_candidates"] == list(task.candidates)
    (search,) = result["searches"]
    probs = dict(zip(task.candidates, search["probs"]))
    assert len(search["probs"]) == len(task.candidates) and sum(probs.values()) == pytest.approx(1.0)
    ranked = sorted(task.candidates, key=lambda d: -probs[d])
    assert set(ranked[:len(expected)]) == set(expected) and search["recovered"]
    assert search["mass_on_expected"] == pytest.approx(sum(probs[d] for d in expected))
    assert search["mass_on_expected"] > len(expected) / len(task.candidates) + 0.05  # moved away from uniform
    assert search["kept"] == [d for d in task.candidates if d in ranked[:len(expected)]]  # k = |E|
    assert search["right_by_epoch"][-1] and search["path_steps"] == search["path_steps_by_epoch"][-1]
    # compute: 512 images x 1 layer x 8 paths per epoch for joint with path dropout 0.5 (about half of them run)
    assert 0 < search["path_steps"] < search["epochs"] * 4 * 64 * 8
    assert search["path_steps_to_answer"] == search["path_steps_by_epoch"][search["right_from_epoch"] - 1]

    runs = {c["name"]: c["runs"] for c in result["candidates"]}
    assert [r["directions"] for r in runs["searched (joint)"]] == [search["kept"]]
    assert runs["expected"][0]["val_top1"] >= 95.0  # the premise: E carries the label ...
    assert runs["complement"][0]["val_top1"] <= result["chance_top1"] + 15.0  # ... and nothing else does
    assert runs["complement"][0]["carriers"] == 0 and runs["expected"][0]["carriers"] == len(expected)
    # on the planted task the fixed set h, h_flip, v, v_flip is one of these: no carrier, chance
    assert all(r["val_top1"] <= result["chance_top1"] + 15.0 for c in runs.values() for r in c if r["carriers"] == 0)
    k = len(expected)
    assert result["p_random_set_without_carrier"] == math.comb(8 - k, k) / math.comb(8, k)
    assert result["p_random_set_holds_answer"] == 1 / math.comb(8, k)
    assert len(runs["random"][0]["directions"]) == k


def test_a_pair_task_needs_both_directions(tmp_path):
    """The premise of a pair task in small form: E retrained learns the label, a set with one of its two
    directions reads one bit (at most half the images; a set with neither: chance, the record's premise)."""
    import bench_search_validity as bench
    from nas.cli.search import parse_args, resolve_config
    from validity_tasks import register_models, write_task

    task = PAIRS[0]
    model, _ = register_models()
    data = write_task(task, str(tmp_path / "data"), 32, 32, seed=1234)
    space = bench.search_space(task, model, 1, 2, tmp_path)
    cfg, _ = resolve_config(*parse_args(["-c", str(space), "--data", data, "--out", str(tmp_path / "search")]))
    cfg["retrain"]["train"]["batch_size"] = 16  # 8 steps per epoch of the 128 images
    retrain = bench.Retrainer(tmp_path / "retrain", cfg, task.candidates)
    expected = pair_directions(task.cells, task.grid, REACH)
    one = [expected[0], next(d for d in DIRECTIONS if d not in expected)]
    top1 = {name: retrain(d, 0)["val_top1"] for name, d in (("E", expected), ("one", one))}
    assert top1["E"] >= 90.0 and top1["one"] <= 50.0 + 12.0, top1
