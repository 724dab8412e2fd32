"""The example scripts run (tiny settings) and print the JSON they promise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hicd_core.data import ArrayDataset, DegradedView, synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bench_prints_json():
    line = run_script("benchmarks/bench.py", "--steps", "1", "--batch", "1", "--size", "16", "--mode", "hicd",
                      "--json").strip().splitlines()[-1]
    result = json.loads(line)
    assert result["mode"] == "hicd" and result["median_ms"] > 0 and result["peak_mem_mb"] > 0


def test_bench_times_fc_siam_diff_against_its_twin():
    pytest.importorskip("torch")
    line = run_script("benchmarks/bench.py", "--model", "fc-siam-diff", "--dropout", "0", "--steps", "1", "--batch",
                      "1", "--size", "16", "--vs-torch", "--json").strip().splitlines()[-1]
    result = json.loads(line)
    assert result["model"] == "fc-siam-diff" and result["dropout"] == 0.0 and result["ratio"] > 0


def test_bench_loss_prints_json():
    result = json.loads(run_script("benchmarks/bench_loss.py", "--batch", "1", "--repeats", "1",
                                   "--no-torch").strip().splitlines()[-1])
    assert result["median_ms"] > 0 and result["loss"] >= 0


def test_bench_loss_interleaved_with_the_torch_twin():
    pytest.importorskip("torch")
    result = json.loads(run_script("benchmarks/bench_loss.py", "--batch", "1", "--repeats", "2",
                                   "--interleave").strip().splitlines()[-1])
    assert result["interleaved"] and result["median_ms"] > 0 and result["torch_median_ms"] > 0
    assert result["ratio"] == pytest.approx(result["median_ms"] / result["torch_median_ms"], abs=2e-3)
    assert result["chg_grad_max_abs_diff"] < 1e-5  # the two losses agree


def test_profile_layers_prints_a_row_per_layer_and_totals():
    lines = run_script("benchmarks/profile_layers.py", "--batch", "1", "--size", "16").strip().splitlines()
    rows = [json.loads(line) for line in lines]
    layers = [row["layer"] for row in rows[:-1]]
    assert layers[0] == "enc1.0" and layers[-1] == "dec1" and len(layers) == 12
    totals = rows[-1]["totals"]
    keys = ("conv_fwd_flat", "conv_bwd_merged", "conv_bwd_flat_one_product", "bn_fwd", "bn_channel_sum",
            "bn_square_sum_dot", "bn_scale_shift")
    for key in keys:
        assert totals[key] > 0, key
    errors = [row["flat_one_product_err"] for row in rows[:-1] if "flat_one_product_err" in row]
    assert len(errors) == 9 and max(errors) < 1e-5  # the candidate flat backward agrees with conv2d_backward


def test_reproduce_writes_rows_report_and_resumes(tmp_path):
    """A one-setting, one-seed, one-variant sweep writes its rows and report, and a rerun adds nothing."""
    results, report = tmp_path / "rows.json", tmp_path / "docs" / "REPORT.md"
    args = ("examples/reproduce.py", "--profile", "quick", "--settings", "single", "--seeds", "0",
            "--variants", "baseline", "--out", str(tmp_path / "runs"), "--results", str(results),
            "--report", str(report), "--no-progress")
    run_script(*args, "--teacher-only")  # the first stage: the teacher's rows, no student
    assert [r["method"] for r in json.loads(results.read_text())] == ["teacher HQ/HQ", "teacher HQ/LQ"]
    (teacher_dir,) = (tmp_path / "runs").rglob("teacher")
    shutil.rmtree(teacher_dir)  # a fresh baseline student learns without it: it is not trained again
    run_script(*args)  # the students
    assert not teacher_dir.exists()
    rows = json.loads(results.read_text())
    assert [r["method"] for r in rows] == ["teacher HQ/HQ", "teacher HQ/LQ", "student baseline"]
    assert all(set(r) == {"setting", "method", "seed", "init", "best_epoch", "epochs_run", "val_f1", "f1", "iou",
                          "precision", "recall", "oa", "kappa", "host"} for r in rows)  # a baseline used no teacher
    assert len({r["host"] for r in rows}) == 1 and "CPU" in rows[0]["host"]
    assert all(r["init"] == "fresh" and 1 <= r["best_epoch"] <= r["epochs_run"] == len(r["val_f1"]) for r in rows)
    text = report.read_text()
    assert "[`rows.json`](../rows.json)" in text and "| student baseline |" in text
    assert (tmp_path / "docs" / "images" / "reproduce_f1.png").exists()
    meta_path = tmp_path / "rows_meta.json"
    commands = json.loads(meta_path.read_text())["commands"]  # both stages' invocations, in order
    assert len(commands) == 2 and commands[0].endswith("--teacher-only") and commands[1].endswith("--no-progress")
    assert "- commands (each measured some of the rows):" in text and f"  - `{commands[1]}`" in text
    assert "student baseline" not in run_script(*args)  # resumed: nothing left to measure
    assert json.loads(results.read_text()) == rows
    assert json.loads(meta_path.read_text())["commands"] == commands  # a run that measured nothing is not named


def write_scenes(root, sizes, seed=0):
    """A tiny A/B/label folder of scenes of different sizes, with a grey anti-aliased mask edge."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = a.copy()
        lab = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        b[y:y + 12, x:x + 12] = 255 - b[y:y + 12, x:x + 12]
        lab[y:y + 12, x:x + 12] = 255
        lab[y, x:x + 12] = 200
        for sub, arr in (("A", a), ("B", b), ("label", lab)):
            Image.fromarray(arr).save(root / sub / f"scene_{i}.png")
    return root


def test_reproduce_on_a_folder_writes_rows_per_scene_report_and_plots(tmp_path):
    pytest.importorskip("PIL")
    data = write_scenes(tmp_path / "data", [(40, 48)] * 5 + [(48, 56)] * 5)
    results, report = tmp_path / "rows.json", tmp_path / "docs" / "REPORT.md"
    args = ("examples/reproduce.py", "--data", str(data), "--label-threshold", "128", "--profile", "real-quick",
            "--settings", "multi", "--seeds", "0", "--variants", "baseline", "hicd", "--out", str(tmp_path / "runs"),
            "--results", str(results), "--report", str(report), "--no-progress")
    run_script(*args)
    rows = json.loads(results.read_text())
    # the baseline needs no teacher: it is measured first, the teacher only when a row needs it
    assert [r["method"] for r in rows] == ["student baseline", "teacher HQ/HQ", "teacher HQ/LQ", "student HiCD full"]
    assert not any("threshold" in r for r in rows)  # scored at 0.5: the profile has no threshold grid
    lists = {p: (tmp_path / "runs" / "data" / "list" / f"{p}.txt").read_text().split() for p in ("train", "val", "test")}
    assert sorted(sum(lists.values(), [])) == sorted(f"scene_{i}" for i in range(10))  # each scene in one split
    for r in rows:
        assert set(r["f1_per_scene"]) == set(lists["test"]) and r["epochs_run"] <= 2 and "val_f1" in r
    text = report.read_text()
    assert "F1 per test scene" in text and "| student HiCD full |" in text and "Best validation epoch" in text
    assert (tmp_path / "docs" / "images" / "data_f1.png").exists()
    assert (tmp_path / "docs" / "images" / "data_curves.png").exists()
    assert "student" not in run_script(*args)  # resumed: nothing left to measure
    bad = run_script_fails("examples/reproduce.py", "--data", str(data), "--profile", "real-quick", "--seeds", "0",
                           "--out", str(tmp_path / "runs2"), "--results", str(tmp_path / "r2.json"),
                           "--report", str(tmp_path / "R2.md"), "--no-progress")
    assert "label values" in bad and "--label-threshold" in bad and "Traceback" not in bad


def run_script_fails(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stderr)
    return out.stderr


def _reproduce_module():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


@pytest.mark.parametrize("folder, key, n_train", [("levir-cd-samples", "levir-samples", 7),
                                                  ("sztaki-airchange", "sztaki", 9)])
def test_named_splits_are_disjoint_and_recognised(folder, key, n_train):
    """The documented splits of the real samples in ../shared (skip without it)."""
    root = ROOT.parent / "shared" / "data" / folder
    if not root.is_dir():
        pytest.skip(f"../shared/data/{folder} is absent")
    reproduce = _reproduce_module()
    prof = reproduce.PROFILES["levir" if key == "levir-samples" else "real"]
    train, val, test, described, found = reproduce.folder_splits(root, prof)
    split = reproduce.SPLITS[key]
    assert found == key and set(test.names) == set(split["test"]) and set(val.names) == set(split["val"])
    assert len(train) == n_train * prof.repeats and len(set(train.dataset.names)) == n_train
    assert not set(train.dataset.names) & (set(test.names) | set(val.names))
    if key == "sztaki":  # the split of Daudt et al. (2018): these two test scenes, whatever else happens
        assert sorted(test.names) == ["szada_1", "tiszadob_3"] and "labels >= 128" in described


@pytest.mark.parametrize("script, framework", [("examples/distill_torch.py", "torch"), ("examples/distill_jax.py", "jax")])
def test_framework_examples_train_and_report_f1(script, framework):
    pytest.importorskip(framework)
    out = run_script(script, "--steps", "3", "--size", "16")
    assert "student step    3" in out and "HiCD student F1" in out


def test_a_folder_without_a_split_needs_a_place_for_its_lists(tmp_path):
    pytest.importorskip("PIL")
    from hicd_core.errors import DatasetError

    reproduce = _reproduce_module()
    data = write_scenes(tmp_path / "data", [(40, 48)] * 5)
    with pytest.raises(DatasetError, match="neither a named split.*a seeded split needs a folder"):
        reproduce.folder_splits(data, reproduce.PROFILES["real-quick"], label_threshold=128)
    assert len(reproduce.folder_splits(data, reproduce.PROFILES["real-quick"], label_threshold=128,
                                       out=tmp_path / "runs")[1]) >= 1


def test_threshold_probe_table_gives_each_checkpoint_its_best_threshold_and_the_spread(tmp_path):
    rows = [{"checkpoint": "a", "pairs": "multi", "val_f1_by_threshold": {"0.3": 40.0, "0.5": 50.0, "0.65": 55.0},
             "val_precision_recall_by_threshold": {"0.5": [40.0, 70.0]}},
            {"checkpoint": "b", "pairs": "multi", "val_f1_by_threshold": {"0.45": 52.0, "0.5": 52.0, "0.6": 52.0}},
            {"checkpoint": "c", "val_f1_by_threshold": {"0.4": 30.0}}]  # an old row without 0.5: left out
    (tmp_path / "t.json").write_text(json.dumps(rows))
    out = run_script("examples/probes/threshold_probe.py", "--table", "--results", str(tmp_path / "t.json"))
    assert "| a | multi | 50.00 | 40.0 / 70.0 | 0.65 | 55.00 | +5.00 |" in out
    assert "| b | multi | 52.00 | – / – | 0.50 | 52.00 | +0.00 |" in out  # a tie: the threshold nearest 0.5
    assert "| multi | 2 | 51.00 ± 1.41 | 53.50 ± 2.12 |" in out and "| c |" not in out
    only = run_script("examples/probes/threshold_probe.py", "--table", "b", "--results", str(tmp_path / "t.json"))
    assert "| a |" not in only and "| multi | 1 | 52.00 ± 0.00 | 52.00 ± 0.00 |" in only


def test_recipe_probe_table_reads_rows(tmp_path):
    rows = [{"name": "a", "fields": {"normalize": True, "pos_weight": 5.0, "dice_weight": 1.0, "change_crop_rate": 0.5,
                                     "weight_decay": 0.1}, "val_f1": [float(i % 7) for i in range(40)],
             "best_val_f1": 6.0, "best_epoch": 7},
            {"name": "b", "fields": {}, "val_f1": [1.0, 3.0], "best_val_f1": 3.0, "best_epoch": 2}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    lines = run_script("examples/probes/recipe_probe.py", "--results", str(path), "--table").strip().splitlines()
    assert len(lines) == 4
    a = [c.strip() for c in lines[2].split("|")[1:-1]]
    plateau = sum(i % 7 for i in range(20, 40)) / 20
    assert a[:6] == ["`a`", "`real`, weight_decay 0.1", "6.00", "7", "40", f"{39 % 7:.2f}"] and a[6] == f"{plateau:.2f}"
    assert lines[3].split("|")[2].strip() == "none of `real`" and lines[3].split("|")[7].strip() == "-"
    only = run_script("examples/probes/recipe_probe.py", "--results", str(path), "--table", "b").strip().splitlines()
    assert len(only) == 3 and "`b`" in only[2]


def test_reproduce_picks_a_networks_own_profile_unless_one_is_named(tmp_path):
    reproduce = _reproduce_module()
    args = reproduce.parse_args(["--protocol", "converged", "--model", "fc-siam-diff"])
    assert reproduce.choose_study(args) == ("converged-fc-siam-diff", "converged-fc-siam-diff", None)
    prof = reproduce.PROFILES["converged-fc-siam-diff"]
    assert prof.model == "fc-siam-diff" and prof.dropout == 0.0
    assert reproduce.choose_study(reproduce.parse_args(["--model", "fc-siam-diff"]))[1] == "sweep"  # none of its own
    named = reproduce.parse_args(["--protocol", "converged", "--model", "fc-siam-diff", "--profile", "converged"])
    assert reproduce.choose_study(named)[1] == "converged"
    assert reproduce.choose_study(reproduce.parse_args(["--protocol", "converged"]))[:2] == ("converged", "converged")
    real = reproduce.PROFILES["real-fc-siam-diff"]
    assert (real.model, real.dropout, real.weight_decay, real.colour_jitter, real.ema) == ("fc-siam-diff", 0.0, 0.1,
                                                                                          0.2, 0.99)
    assert reproduce.PROFILES["real"].colour_jitter == 0.0 and reproduce.PROFILES["real"].weight_decay == 1e-2


def test_recipe_probe_runs_and_prints_its_model_per_validation_scene(tmp_path):
    from PIL import Image

    data = write_scenes(tmp_path / "data", [(40, 48)] * 6)
    for path in (data / "label").iterdir():  # binary masks: the probe reads unnamed folders without a threshold
        Image.fromarray(np.where(np.asarray(Image.open(path)) >= 128, 255, 0).astype(np.uint8)).save(path)
    common = ("--data", str(data), "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "rows.json"))
    fields = {"epochs": 1, "crop": 16, "repeats": 1, "eval_tile": 32, "batch_size": 2}
    run_script("examples/probes/recipe_probe.py", "p", json.dumps(fields), *common)
    assert [r["name"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["p"]
    lines = run_script("examples/probes/recipe_probe.py", "--scenes", "p", *common).strip().splitlines()
    val = (tmp_path / "runs" / "list" / "val.txt").read_text().split()
    assert len(lines) == 2 + len(val) >= 3 and {line.split("|")[2].strip() for line in lines[2:]} == set(val)
    missing = subprocess.run([sys.executable, "examples/probes/recipe_probe.py", "--scenes", "q", *common], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no selected model of probe 'q'" in missing.stderr
    # scale_probe: the clean view is the recipe probe's own per-scene table; every view has a row
    best = str(tmp_path / "runs" / "p" / "best.h5")
    scaled = run_script("examples/probes/scale_probe.py", best, "--data", str(data), "--out", str(tmp_path / "runs"))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in scaled.strip().splitlines()]
    assert rows[0][3:] == val and [r[1] for r in rows[2:]] == ["clean", "t2 at 1/4", "both at 1/2", "both at 1/4"]
    per_scene = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in lines[2:]}
    assert rows[2][3:] == [per_scene[name] for name in val]
    # tta_probe: a teacher validated on the clean pairs, once as trained (the same table) and once averaged
    tta = run_script("examples/probes/tta_probe.py", best, "--data", str(data), "--out", str(tmp_path / "runs"))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in tta.strip().splitlines()]
    assert rows[0][4:] == val and [r[1:3] for r in rows[2:]] == [["clean pairs", "off"], ["clean pairs", "8 views"]]
    assert rows[2][4:] == [per_scene[name] for name in val]
    # smooth_probe: radius 0 is the run's own per-scene table, then one row per radius
    smooth = run_script("examples/probes/smooth_probe.py", best, "--data", str(data), "--out", str(tmp_path / "runs"))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in smooth.strip().splitlines()]
    assert rows[0][4:] == val and [int(r[2]) for r in rows[2:]] == [0, 2, 4, 8, 12, 16, 24]
    assert rows[2][4:] == [per_scene[name] for name in val]
    profiles = _reproduce_module().PROFILES
    assert profiles["real-fc-siam-diff-filtered"] == replace(profiles["real-fc-siam-diff"], filter_radius=8,
                                                             min_epochs=20)


def _probe_module(name):
    sys.path.insert(0, str(ROOT / "examples" / "probes"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_tta_probe_validates_a_student_on_its_own_degraded_view():
    tta_probe = _probe_module("tta_probe")
    val = ArrayDataset(*synthetic_pairs(2, 16, seed=0))
    assert tta_probe.validation_view(val, {"role": "teacher", "setting": None}) is val
    view = tta_probe.validation_view(val, {"role": "student", "setting": "multi", "val_seed": 7})
    expected = DegradedView(val, "multi", 7)
    for i in range(len(val)):
        for got, want in zip(view[i], expected[i]):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(view[0][1], val[0][1])


def test_budget_probe_keys_rows_by_model_and_finds_the_model_s_teacher(tmp_path):
    budget_probe = _probe_module("budget_probe")
    assert budget_probe.study("tiny-siam-cd") == ("converged", "converged")
    assert budget_probe.study("fc-siam-diff") == ("converged-fc-siam-diff", "converged-fc-siam-diff")
    old = {"setting": "multi", "seed": 0, "variant": "baseline", "budget": 60}  # rows written before --model
    assert budget_probe.row_key(old) == ("tiny-siam-cd", "multi", 0, "baseline", 60)
    assert budget_probe.row_key({**old, "model": "fc-siam-diff"}) != budget_probe.row_key(old)
    # a distilled student needs that model's converged teacher; the error names the file and the command
    out = subprocess.run([sys.executable, "examples/probes/budget_probe.py", "--model", "fc-siam-diff", "--variant",
                          "hicd", "--seed", "987", "--results", str(tmp_path / "rows.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and not (tmp_path / "rows.json").exists()
    assert "converged-fc-siam-diff/seed987/teacher/best.h5" in out.stderr and "--model fc-siam-diff" in out.stderr


def test_selection_probe_correlates_the_selected_validation_f1_with_test_f1(tmp_path):
    def row(setting, val, test):
        return {"setting": setting, "method": "student baseline", "seed": 0, "f1": test, "best_epoch": 2,
                "val_f1": [0.0, val, 1.0]}
    rows = [row("a", v, 2 * v + 1) for v in (1.0, 2.0, 3.0)] + [row("b", v, -v) for v in (1.0, 2.0, 4.0)]
    rows.append({"setting": "a", "method": "teacher HQ/HQ", "seed": 0, "f1": 99.0, "best_epoch": 1, "val_f1": [5.0]})
    path = tmp_path / "study.json"
    path.write_text(json.dumps(rows))
    (tmp_path / "study_meta.json").write_text(json.dumps({"profile": "p: Profile(smoothing=1)"}))
    lines = run_script("examples/probes/selection_probe.py", str(path)).strip().splitlines()
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in lines[2:]}
    assert cells["a"] == ["3", "1", "1.00"] and cells["b"] == ["3", "1", "-1.00"] and cells["all"][0] == "6"
    (tmp_path / "study_meta.json").write_text(json.dumps({"profile": "p: Profile(smoothing=2)"}))  # mean of epochs 1-2
    smoothed = run_script("examples/probes/selection_probe.py", str(path)).strip().splitlines()
    assert [c.strip() for c in smoothed[3].split("|")[3:-1]] == ["3", "2", "1.00"]


def test_summary_lists_studies_with_paired_students_and_skips_a_teacher_only_study(tmp_path):
    reproduce = _reproduce_module()
    (tmp_path / "results").mkdir()

    def row(method, seed, f1, setting="multi"):
        return {"setting": setting, "method": method, "seed": seed, "init": "fresh", "f1": f1}
    teachers = [row("teacher HQ/HQ", s, 50.0) for s in (0, 1)]
    (tmp_path / "results" / "sztaki-fc-siam-diff.json").write_text(json.dumps(teachers))
    pairs = teachers + [row("student baseline", s, 40.0 + s) for s in (0, 1, 2)] + \
        [row("student HiCD full", s, 41.0 + 2 * s) for s in (0, 1, 2)]
    (tmp_path / "results" / "sztaki.json").write_text(json.dumps(pairs))
    lines = reproduce.summary_table(settings=("resolution-x4", "multi"), root=tmp_path).splitlines()
    assert len(lines) == 3 and "sztaki.md) (0-2)" in lines[2]
    cells = [c.strip() for c in lines[2].split("|")[2:-1]]
    assert cells[0] == "–" and cells[1].startswith("+2.00 [")  # differences 1, 2, 3: mean 2


def test_a_report_shows_every_setting_with_rows_whichever_worker_writes_it(tmp_path):
    reproduce = _reproduce_module()
    rows = [{"setting": s, "method": "student baseline", "seed": 0, "init": "fresh", "f1": f1, "iou": f1 / 2,
             "best_epoch": 1, "epochs_run": 2, "val_f1": [1.0, 0.5]}
            for s, f1 in (("multi", 40.0), ("resolution-x4", 50.0))]
    rows[0]["host"], rows[1]["host"] = "cpu A", "cpu B"  # rows measured on two machines
    rows.append({**rows[0], "seed": 1, "best_epoch": 2})
    rows.insert(0, {**rows[0], "seed": 2, "best_epoch": 3})  # rows of seeds 2, 0, 1: the table lists 0, 1, 2
    report = tmp_path / "docs" / "REPORT.md"
    reproduce.write_report(rows, {"commands": ["python examples/reproduce.py --settings multi"]}, ["multi"], report,
                           tmp_path / "docs" / "images" / "x_f1.png", title="t", results=tmp_path / "rows.json",
                           notes=tmp_path / "notes.md")
    text = report.read_text()  # a worker of one setting names both, in the order of SETTINGS
    assert "| method | resolution-x4 F1 | resolution-x4 IoU | multi F1 | multi IoU |" in text
    assert "- command: `python examples/reproduce.py --settings multi`" in text
    assert "- machine: cpu A; cpu B" in text
    assert "| student baseline | 1/2 | 1/2, 2/2, 3/2 |" in text


def test_a_calibrated_study_scores_each_model_at_its_validation_threshold_on_another_study_s_runs(tmp_path,
                                                                                                 monkeypatch):
    pytest.importorskip("PIL")
    from hicd_core.experiment import validation_view
    from hicd_core.infer import choose_threshold
    from hicd_core.networks import load_model

    reproduce = _reproduce_module()
    grid = (0.3, 0.45, 0.5, 0.55, 0.7)
    monkeypatch.setitem(reproduce.PROFILES, "real-quick-calibrated",
                        replace(reproduce.PROFILES["real-quick"], threshold_grid=grid))
    data = write_scenes(tmp_path / "data", [(40, 48)] * 10)
    common = ["--data", str(data), "--label-threshold", "128", "--settings", "multi", "--seeds", "0", "--variants",
              "baseline", "--out", str(tmp_path / "runs"), "--no-progress"]
    reproduce.main(common + ["--profile", "real-quick", "--tag", "plain", "--results", str(tmp_path / "plain.json"),
                             "--report", str(tmp_path / "plain.md")])
    runs = tmp_path / "runs" / "plain" / "seed0"
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.h5")}
    rows = reproduce.main(common + ["--profile", "real-quick-calibrated", "--tag", "calibrated", "--runs-of", "plain",
                                    "--results", str(tmp_path / "cal.json"), "--report", str(tmp_path / "cal.md")])
    assert not (tmp_path / "runs" / "calibrated").exists()  # nothing trained: the plain study's checkpoints
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.h5")} == stamps
    _, val, _, _, _ = reproduce.folder_splits(data, reproduce.PROFILES["real-quick"], label_threshold=128,
                                              out=tmp_path / "lists")
    prof = reproduce.PROFILES["real-quick-calibrated"]
    for r in rows:
        role, folder = (("teacher", runs / "teacher") if r["method"].startswith("teacher")
                        else ("student", runs / "multi" / "student-baseline"))
        expected, scores = choose_threshold(load_model(folder / "best.h5")[0], validation_view(val, role, "multi"),
                                            grid, batch_size=1, tile=prof.eval_tile, filter_radius=prof.filter_radius)
        assert r["threshold"] == expected and scores[expected]["f1"] == max(m["f1"] for m in scores.values())
    assert "Decision threshold of each model" in (tmp_path / "cal.md").read_text()
    # a study that trains differently may not borrow the runs: the checkpoint's configuration is checked
    monkeypatch.setitem(reproduce.PROFILES, "real-quick-other", replace(prof, pos_weight=2.0))
    with pytest.raises(ValueError, match="different configuration"):
        reproduce.main(common + ["--profile", "real-quick-other", "--tag", "other", "--runs-of", "plain",
                                 "--results", str(tmp_path / "o.json"), "--report", str(tmp_path / "o.md")])


def test_the_verdict_states_the_teachers_room_to_distil():
    reproduce = _reproduce_module()
    rows = [{"setting": "multi", "method": m, "seed": s, "f1": f1}
            for s in (0, 1) for m, f1 in (("teacher HQ/HQ", 50.0 + s), ("student baseline", 40.0),
                                         ("student HiCD full", 41.0))]
    text = reproduce.verdict(rows, ["multi"])
    assert "- multi, students fresh: teacher HQ/HQ − baseline = +10.50 F1, the room to distil" in text
    assert "HiCD full − baseline = +1.00 F1" in text


def test_gap_probe_pairs_methods_by_seed_on_validation_test_and_each_scene(tmp_path):
    def row(method, seed, val, test, scenes):
        return {"setting": "x", "method": method, "seed": seed, "init": "fresh", "f1": test, "best_epoch": 1,
                "val_f1": [val], "f1_per_scene": dict(zip(("a", "b"), scenes))}
    rows = [row("teacher HQ/HQ", s, 50.0 + s, 40.0, (30.0, 50.0 + s)) for s in range(3)]
    rows += [row("student baseline", s, 48.0, 45.0 + s, (20.0, 60.0)) for s in range(3)]
    rows.append(row("student HiCD full", 0, 49.0, 45.0, (20.0, 60.0)))  # one seed: a mean, no interval
    rows.append(row("student feature-mse", 2, 47.0, 47.0, (20.0, 60.0)))
    path = tmp_path / "study.json"
    path.write_text(json.dumps(rows))
    lines = run_script("examples/probes/gap_probe.py", str(path)).strip().splitlines()
    assert lines[0].split("|")[4:-1] == [" validation (selected) ", " test, pooled ", " test, a ", " test, b "]
    teacher = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert teacher[:3] == ["x", "teacher HQ/HQ − baseline", "3"]
    assert teacher[3].startswith("+3.00 [") and teacher[3].endswith("(3/3 above 0)")  # 2, 3, 4
    assert teacher[4].startswith("-6.00 [") and teacher[4].endswith("(0/3 above 0)")  # -5, -6, -7
    assert teacher[5] == "+10.00 [+10.00, +10.00] (3/3 above 0)"
    hicd = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert hicd[2] == "1" and hicd[3] == "+1.00 (1/1 above 0)" and hicd[4] == "+0.00 (0/1 above 0)"
    assert lines[4].split("|")[2].strip() == "student feature-mse − baseline" and lines[4].split("|")[3].strip() == "1"
    assert len(lines) == 5
    # --against: each method minus the same method of another study, paired by setting and seed
    other = [dict(r, f1=r["f1"] - 1.0, f1_per_scene={"a": r["f1_per_scene"]["a"] + 2.0}) for r in rows
             if r["seed"] != 2]
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    versus = run_script("examples/probes/gap_probe.py", str(path), "--against", str(other_path)).strip().splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in versus]
    assert cells[0] == ["setting", "method", "seeds", "test, pooled", "test, a", "test, b"]
    assert [c[1:3] for c in cells[2:]] == [["teacher HQ/HQ", "2"], ["student baseline", "2"],
                                           ["student HiCD full", "1"]]  # feature-mse: seed 2 only, not there
    assert cells[2][3] == "+1.00 [+1.00, +1.00] (2/2 above 0)" and cells[2][4] == "-2.00 [-2.00, -2.00] (0/2 above 0)"
    assert cells[2][5] == "–"  # scene b is not in the other study's rows
    missing = subprocess.run([sys.executable, "examples/probes/gap_probe.py", str(path), "--against",
                              str(tmp_path / "none.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no rows at" in missing.stderr and "none.json" in missing.stderr


def test_site_probe_trains_one_site_on_as_many_crops_per_epoch_as_the_joint_teacher():
    root = ROOT.parent / "shared" / "data" / "sztaki-airchange"
    if not root.is_dir():
        pytest.skip("../shared/data/sztaki-airchange is absent")
    site_probe = _probe_module("site_probe")
    prof = _reproduce_module().PROFILES["real-fc-siam-diff-filtered"]
    joint, joint_val, _ = site_probe.site_splits(root, prof, "all")
    assert len(joint) == 9 * prof.repeats and joint_val.names == ["szada_2", "tiszadob_2"]
    tisza, tisza_val, described = site_probe.site_splits(root, prof, "tiszadob")
    assert tisza.dataset.names == ["tiszadob_1", "tiszadob_4", "tiszadob_5"] and tisza_val.names == ["tiszadob_2"]
    assert tisza.times == 48 and len(tisza) == len(joint) and "48 crops each" in described
    szada, szada_val, _ = site_probe.site_splits(root, prof, "szada")
    assert len(szada.dataset) == 5 and szada_val.names == ["szada_2"] and 0 <= len(szada) - len(joint) < 5
    longer, longer_val, _ = site_probe.site_splits(root, prof, "all", 3)
    assert len(longer) == 3 * len(joint) and longer_val.names == joint_val.names
    with pytest.raises(SystemExit, match="starts with 'x'"):
        site_probe.site_splits(root, prof, "x")


def test_site_probe_table_sets_each_run_beside_the_study_teacher_of_its_seed():
    site_probe = _probe_module("site_probe")
    row = lambda site, seed, scenes, budget=1, crops=16: {  # noqa: E731
        "site": site, "seed": seed, "budget": budget, "profile": "real-fc-siam-diff-filtered", "split": "",
        "crops_per_scene": crops, "min_epochs": 20, "val_f1": [1.0, 5.0, 2.0], "val_f1_per_scene": scenes}
    rows = [row("all", 0, {"szada_2": 50.0, "tiszadob_2": 40.0}), row("tiszadob", 0, {"tiszadob_2": 43.5}, crops=48),
            row("all", 0, {"szada_2": 49.0, "tiszadob_2": 45.0}, budget=3, crops=48), row("szada", 1, {"szada_2": 7.0})]
    main, _, summary = site_probe.table(rows).partition("\n\n")
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in main.splitlines()]
    assert len(lines) == 2 + 4
    # the summary pairs each change with the study's teacher of its seed (seed 1 has none here)
    summed = [[c.strip() for c in line.split("|")[1:-1]] for line in summary.splitlines()]
    assert [r[0] for r in summed[2:]] == ["tiszadob only", "both sites, 3 x the crops"]
    assert summed[2][-1] == "+3.50" and summed[3][-1] == "+0.00"
    assert lines[2] == ["0", "both sites, 3 x the crops", "48 per scene", "2 / 3", "5.00 (5.00)", "szada_2", "49.00", "50.00", "-1.00"]
    assert lines[4] == ["0", "tiszadob only", "48 per scene", "2 / 3", "5.00", "tiszadob_2", "43.50", "40.00", "+3.50"]
    assert lines[5][0] == "1" and lines[5][-2:] == ["–", "–"]
    weighted = dict(row("all", 0, {"szada_2": 52.0, "tiszadob_2": 40.0}), set={"pos_weight": "auto"})
    lines = [[c.strip() for c in line.split("|")[1:-1]]
             for line in site_probe.table(rows + [weighted]).partition("\n\n")[0].splitlines()]
    assert ["both sites, pos_weight auto", "szada_2", "52.00", "50.00", "+2.00"] in [ln[1:2] + ln[5:] for ln in lines]
    larger = dict(row("all", 0, {"szada_2": 51.0, "tiszadob_2": 41.0}, crops=4), set={"crop": 256})
    assert len(site_probe.table(rows + [larger]).partition("\n\n")[0].splitlines()) == 2 + 4 + 2  # not the study's
    # the same change to another profile's teacher is paired with that profile's teacher, and named apart
    precise = [dict(r, profile="real-fc-siam-diff-precise", min_epochs=40) for r in rows[:3:2]]
    precise[0]["val_f1"] = [1.0, 8.0, 2.0]
    summed = [[c.strip() for c in line.split("|")[1:-1]]
              for line in site_probe.table(rows + precise).partition("\n\n")[2].splitlines()]
    assert ["both sites, 3 x the crops", "0", "+0.00"] in summed
    assert ["both sites, 3 x the crops, profile real-fc-siam-diff-precise", "0", "-3.00"] in summed
    assert site_probe.fields(["pos_weight=16", "normalize=image"]) == {"pos_weight": 16, "normalize": "image"}
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        site_probe.fields(["pos_weight"])


def test_seed_probe_tables_initial_weights_against_data_with_the_study_on_the_diagonal():
    seed_probe = _probe_module("seed_probe")
    study = [{"setting": "x", "method": "student baseline", "seed": s, "init": "fresh", "val_f1": curve,
              "best_epoch": 2} for s, curve in ((0, [40.0, 50.0, 49.0]), (3, [30.0, 42.0, 35.0]))]
    study.append({"setting": "x", "method": "student HiCD full", "seed": 0, "init": "fresh", "val_f1": [1.0, 99.0],
                  "best_epoch": 2})  # not a baseline: not on the diagonal
    mixed = lambda init, data, curve, best: {"setting": "x", "variant": "baseline", "init_seed": init,  # noqa: E731
                                             "data_seed": data, "profile": "p", "val_f1": curve, "best_epoch": best}
    half = seed_probe.table([mixed(3, 0, [44.0, 41.0, 40.0], 1)], study)
    lines = half.splitlines()
    assert lines[0] == "x, seeds 0 and 3: selected validation F1 (best epoch, last-epoch F1)"
    assert lines[4] == "| seed 0 | 50.00 (2, 49.00) | – |"
    assert lines[5] == "| seed 3 | 44.00 (1, 40.00) | 42.00 (2, 35.00) |"
    assert "effect" not in half  # one mixed run: no effects yet
    full = seed_probe.table([mixed(3, 0, [44.0, 41.0, 40.0], 1), mixed(0, 3, [46.0, 47.0, 45.0], 2)], study)
    # init: (50 + 47 - 44 - 42) / 2 = 5.5; data: (50 + 44 - 47 - 42) / 2 = 2.5
    assert full.splitlines()[-1] == ("effect of the initial weights (seed 0 - seed 3): +5.50; "
                                     "effect of the data (seed 0 - seed 3): +2.50")
    assert seed_probe.table([], study) == "seed_probe: no rows yet"
    changed = dict(mixed(3, 3, [45.0, 47.0, 46.0], 2), set={"precise_bn": 144})
    lines = seed_probe.table([mixed(3, 0, [44.0, 41.0, 40.0], 1), changed], study).splitlines()
    assert lines[5] == "| seed 3 | 44.00 (1, 40.00) | 42.00 (2, 35.00) |"  # the changed run is not a cell
    assert lines[-1] == "| x | 3 / 3 | precise_bn 144 | 47.00 (2, 46.00) | 42.00 (2, 35.00) |"
    assert seed_probe.key(changed) != seed_probe.key(dict(changed, set=None))
    same = subprocess.run([sys.executable, "examples/probes/seed_probe.py", "--data-seed", "2", "--init-seed", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert same.returncode != 0 and "equals --data-seed" in same.stderr
    bad = subprocess.run([sys.executable, "examples/probes/seed_probe.py", "--setting", "x9", "--init-seed", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown setting 'x9'" in bad.stderr
    nowhere = subprocess.run([sys.executable, "examples/probes/seed_probe.py", "--init-seed", "1", "--data",
                              str(ROOT / "no-such-folder")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert nowhere.returncode != 0 and "no data folder at" in nowhere.stderr


def test_bn_probe_carries_statistics_on_without_touching_the_model_and_tables_the_draws():
    from hicd_core.data.loader import TrainBatches
    from hicd_core.networks import build_model

    bn_probe = _probe_module("bn_probe")
    model = build_model("fc-siam-diff", (4, 4, 8, 8), dtype="float64", dropout=0.0, seed=1)
    saved = {k: v.copy() for k, v in model.buffers.items()}
    data = ArrayDataset(*synthetic_pairs(8, 16, seed=2))
    one = bn_probe.carried_on(model, TrainBatches(data, 4, rng=np.random.default_rng(0)), 3)
    assert all(np.array_equal(model.buffers[k], saved[k]) for k in saved)
    again = TrainBatches(data, 4, rng=np.random.default_rng(0))
    for x1, x2, _, _ in [*again.epoch(), *again.epoch()][:3]:  # two batches an epoch: cycled
        model.forward(x1, x2, training=True)  # momentum 0.1 from the saved statistics
    for k in saved:
        np.testing.assert_allclose(one[k], model.buffers[k], rtol=1e-12, atol=1e-12)
        assert not np.allclose(one[k], saved[k])
    score = lambda f1: {"f1": f1, "precision": 0.0, "recall": 0.0, "per_scene": {}}  # noqa: E731
    rows = [{"checkpoint": "a/best.h5", "profile": "p", "batches": 18, "saved": score(59.61),
             "running": [score(55.8), score(56.62)], "precise": [score(55.35), score(55.9)]}]
    lines = bn_probe.table(rows).splitlines()
    assert lines[2] == "| `a/best.h5` | 59.61 | 55.80, 56.62 (56.21) | 55.35, 55.90 (55.62) |"
    assert bn_probe.seeds_table(rows).splitlines()[2:] == []  # a teacher's row: not a student's
    student = dict(rows[0], checkpoint="s/best.h5", role="student", setting="multi",
                   saved={"f1": 47.0, "precision": 25.0}, precise=[{"f1": 50.0, "precision": 30.0},
                                                               {"f1": 53.0, "precision": 34.0}])
    assert bn_probe.seeds_table(rows + [student]).splitlines()[2:] == [
        "| `s/best.h5` | multi | 18 | 47.00 (25.00) | 51.50 (32.00) | 3.00 | +4.50 |", "",
        "range of F1 over the draws, mean over 1 checkpoint(s): 3.00"]
    study = lambda seed, variant, saved, common: dict(  # noqa: E731
        student, checkpoint=f"runs/reproduce/x/seed{seed}/multi/student-{variant}/best.h5",
        saved={"f1": saved, "precision": 0.0}, precise=[{"f1": common, "precision": 0.0}])
    gap = bn_probe.weak_seed_gap([study(1, "hicd", 56.0, 57.0), study(2, "hicd", 58.0, 57.0),
                                  study(3, "hicd", 47.0, 53.0), study(1, "feature-mse", 55.0, 55.0),
                                  study(3, "feature-mse", 50.0, 52.0), study(2, "baseline", 50.0, 50.0),
                                  student], 3).splitlines()
    assert gap == ["multi feature-mse: seeds [1] minus seed 3: saved +5.00, common +3.00",
                   "multi hicd: seeds [1, 2] minus seed 3: saved +10.00, common +4.00",
                   "multi, mean over 2 variant(s): D_saved +7.50, D_common +3.50, D_common / D_saved 0.47"]
    # a student's batches and validation pairs carry its setting's degraded t2; a teacher's are clean
    prof = _reproduce_module().PROFILES["real-fc-siam-diff-precise"]
    val = ArrayDataset(*synthetic_pairs(2, 16, seed=3))
    cfg, view, role, setting = bn_probe.run_views({"role": "student", "setting": "multi"}, prof, val)
    assert (cfg.role, cfg.setting, role, setting) == ("student", "multi", "student", "multi")
    assert not np.array_equal(view[0][1], val[0][1]) and np.array_equal(view[0][0], val[0][0])
    cfg, view, role, setting = bn_probe.run_views({}, prof, val)
    assert (cfg.role, role, setting) == ("teacher", "teacher", None) and view is val


def test_site_probe_curves_give_take_off_best_and_mean_jump(tmp_path):
    site_probe = _probe_module("site_probe")
    row = {"site": "all", "seed": 0, "budget": 1, "profile": "real-fc-siam-diff-filtered", "crops_per_scene": 16,
           "min_epochs": 20, "val_f1": [10.0] * 10 + [30.0, 34.0, 32.0, 35.0], "val_f1_per_scene": {}}
    study = tmp_path / "study.json"
    study.write_text(json.dumps([{"method": "teacher HQ/HQ", "setting": "resolution-x4", "seed": 1,
                                  "val_f1": [31.0, 20.0]},
                                 {"method": "teacher HQ/HQ", "setting": "multi", "seed": 1, "val_f1": [31.0, 20.0]}]))
    lines = site_probe.curves([row, dict(row, site="szada")], [study]).splitlines()
    assert len(lines) == 2 + 2  # the site teacher is left out, the study's teacher counted once
    assert lines[2] == "| site_probe: both sites | 0 | 11 | 35.00 / 14 / 14 | 3.00 |"  # jumps 4, 2, 3
    assert lines[3] == "| study: teacher | 1 | 1 | 31.00 / 1 / 2 | – |"
