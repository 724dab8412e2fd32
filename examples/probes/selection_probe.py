"""Does the validation F1 that selects a model say anything about its test F1? (issue 27, item 3)

    python examples/probes/selection_probe.py results/sztaki.json results/sztaki-smoothed.json

For every study's rows (written by ``examples/reproduce.py``), the students' validation F1 at
the selected epoch (the mean of ``smoothing`` epochs where the study's profile smoothed it,
read from ``<study>_meta.json`` when present) against their pooled test F1: Pearson's r over
all student rows, and within each setting. An r near zero means that the epoch and the seed
chosen on validation are, as far as the test scenes can tell, a draw: validation is too small
or too unlike the test scenes to rank models, and spread over seeds follows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np


def selected_val_f1(row, smoothing=1):
    """The validation F1 that chose the row's model: at its best epoch, smoothed as the study did."""
    curve, best = row["val_f1"], row["best_epoch"]
    window = curve[max(0, best - smoothing):best]
    return sum(window) / len(window)


def pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def study_smoothing(path):
    """The ``smoothing`` of the profile that measured a study's rows (``<study>_meta.json``), 1 without one."""
    meta = Path(path).with_name(Path(path).stem + "_meta.json")
    if not meta.exists():
        return 1
    found = re.search(r"smoothing=(\d+)", str(json.loads(meta.read_text()).get("profile", "")))
    return int(found.group(1)) if found else 1


def study_lines(path):
    rows = json.loads(Path(path).read_text())
    smoothing = study_smoothing(path)
    students = [r for r in rows if r["method"].startswith("student") and "val_f1" in r and "best_epoch" in r]
    if not students:
        return [f"| `{path}` | all | 0 | - | - |"]
    groups = {"all": students}
    for r in students:
        groups.setdefault(r["setting"], []).append(r)
    lines = []
    for name, group in groups.items():
        val = [selected_val_f1(r, smoothing) for r in group]
        test = [r["f1"] for r in group]
        lines.append(f"| `{path}` | {name} | {len(group)} | {smoothing} | {pearson(val, test):.2f} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="rows JSON of examples/reproduce.py")
    args = parser.parse_args(argv)
    lines = ["| rows | students of | n | smoothing | r(selected validation F1, test F1) |",
             "|---|---|---:|---:|---:|"]
    for path in args.results:
        if not Path(path).exists():
            sys.exit(f"selection_probe: no rows at {path}")
        lines += study_lines(path)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
