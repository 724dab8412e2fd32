"""The example scripts run (tiny settings) and print the JSON they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bench_prints_json():
    line = run_script("examples/bench.py", "--steps", "1", "--batch", "1", "--size", "16", "--mode", "hicd",
                      "--json").strip().splitlines()[-1]
    result = json.loads(line)
    assert result["mode"] == "hicd" and result["median_ms"] > 0 and result["peak_mem_mb"] > 0


def test_bench_loss_prints_json():
    result = json.loads(run_script("examples/bench_loss.py", "--batch", "1", "--repeats", "1",
                                   "--no-torch").strip().splitlines()[-1])
    assert result["median_ms"] > 0 and result["loss"] >= 0


def test_profile_layers_prints_a_row_per_layer_and_totals():
    lines = run_script("examples/profile_layers.py", "--batch", "1", "--size", "16").strip().splitlines()
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
    run_script(*args)
    rows = json.loads(results.read_text())
    assert [r["method"] for r in rows] == ["teacher HQ/HQ", "teacher HQ/LQ", "student baseline"]
    assert all(set(r) == {"setting", "method", "seed", "f1", "iou", "precision", "recall", "oa", "kappa"}
               for r in rows)
    text = report.read_text()
    assert "[`rows.json`](../rows.json)" in text and "| student baseline |" in text
    assert (tmp_path / "docs" / "images" / "reproduce_f1.png").exists()
    assert "student baseline" not in run_script(*args)  # resumed: nothing left to measure
    assert json.loads(results.read_text()) == rows


def test_levir_split_is_disjoint():
    """The documented split of the 11 LEVIR-CD sample tiles (skips without ../shared)."""
    root = ROOT.parent / "shared" / "data" / "levir-cd-samples"
    if not root.is_dir():
        pytest.skip("../shared/data/levir-cd-samples is absent")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    train, val, test = reproduce.levir_splits(root)
    assert len(test) == 3 and len(val) == 1 and len(train) == 7 * reproduce.LEVIR_CROPS_PER_TILE
    assert set(test.names) == set(reproduce.LEVIR_SPLIT["test"]) and set(val.names) == set(reproduce.LEVIR_SPLIT["val"])
    assert len(set(train.dataset.names)) == 7 and not set(train.dataset.names) & (set(test.names) | set(val.names))
