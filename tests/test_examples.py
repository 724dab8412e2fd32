"""The example scripts run (tiny settings) and print the JSON they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
