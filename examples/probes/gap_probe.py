"""Where do two methods of a study differ: on the validation scenes, on the pooled test set,
on which test scene? (issue 27, item 3: why do baseline students beat their teachers?)

    python examples/probes/gap_probe.py results/sztaki-fc-siam-diff.json

For every setting and pair of methods (teacher HQ/HQ − student baseline, HiCD full − baseline,
feature-MSE − baseline where present), paired by seed: the mean difference of the selected
validation F1 (the F1 that chose each model; the teacher's is on clean validation pairs, the
students' on degraded ones), of the pooled test F1 and of each test scene's F1, each with its
95 % interval (t over seeds) and how many seeds went each way. Nothing is trained; only the
committed rows are read. A gap that shows on one test scene and not on validation is a property
of that scene, which no choice made on validation could have seen.

    python examples/probes/gap_probe.py results/sztaki-fc-siam-diff-filtered.json \
        --against results/sztaki-fc-siam-diff.json

pairs each method of the first study with the same method, setting and seed of the second (first
minus second) on the pooled test F1 and each test scene's: what a change of protocol did to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "probes"))

from reproduce import t_interval  # noqa: E402
from selection_probe import selected_val_f1, study_smoothing  # noqa: E402

PAIRS = (("teacher HQ/HQ", "student baseline"), ("student HiCD full", "student baseline"),
         ("student feature-mse", "student baseline"))


def measures(row, smoothing):
    """``{name: F1}`` of one row: selected validation, pooled test, and each test scene."""
    out = {}
    if "val_f1" in row and "best_epoch" in row:
        out["validation (selected)"] = selected_val_f1(row, smoothing)
    out["test, pooled"] = row["f1"]
    for scene, f1 in sorted(row.get("f1_per_scene", {}).items()):
        out[f"test, {scene}"] = f1
    return out


def cell(diffs):
    """'mean [lo, hi] (up/n)' of paired differences; '–' without any."""
    if not diffs:
        return "–"
    ci = t_interval(diffs)
    up = sum(d > 0 for d in diffs)
    span = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    return f"{statistics.mean(diffs):+.2f}{span} ({up}/{len(diffs)} above 0)"


def study_table(path):
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("init", "fresh") == "fresh"]
    smoothing = study_smoothing(path)
    by = {(r["setting"], r["method"], r["seed"]): measures(r, smoothing) for r in rows}
    names = list(dict.fromkeys(k for m in by.values() for k in m))
    lines = ["| setting | difference | seeds | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for a, b in PAIRS:
            seeds = sorted({s for (st, m, s) in by if st == setting and m == a}
                           & {s for (st, m, s) in by if st == setting and m == b})
            if not seeds:
                continue
            cells = []
            for name in names:
                d = [by[(setting, a, s)][name] - by[(setting, b, s)][name] for s in seeds
                     if name in by[(setting, a, s)] and name in by[(setting, b, s)]]
                cells.append(cell(d))
            lines.append(f"| {setting} | {a} − {b.removeprefix('student ')} | {len(seeds)} | "
                         + " | ".join(cells) + " |")
    return lines


def versus_table(path, other):
    """Each method of one study against the same method of another (``path`` − ``other``), paired by
    setting and seed, on the pooled test F1 and each test scene's: what changing the protocol did."""
    mine, theirs = ({(r["setting"], r["method"], r["seed"]): {k: v for k, v in measures(r, 1).items()
                                                              if k.startswith("test")}
                     for r in json.loads(Path(p).read_text()) if r.get("init", "fresh") == "fresh"}
                    for p in (path, other))
    names = list(dict.fromkeys(k for m in mine.values() for k in m))
    lines = ["| setting | method | seeds | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    for setting, method in dict.fromkeys(k[:2] for k in mine):
        seeds = sorted(k[2] for k in mine if k[:2] == (setting, method) and k in theirs)
        if not seeds:
            continue
        pairs = [(mine[(setting, method, s)], theirs[(setting, method, s)]) for s in seeds]
        cells = [cell([a[name] - b[name] for a, b in pairs if name in a and name in b]) for name in names]
        lines.append(f"| {setting} | {method} | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="rows JSON of examples/reproduce.py")
    parser.add_argument("--against", metavar="OTHER",
                        help="rows JSON of another study: each method here minus the same method there, by seed")
    args = parser.parse_args(argv)
    for path in (args.results, args.against):
        if path is not None and not Path(path).exists():
            sys.exit(f"gap_probe: no rows at {path}")
    lines = versus_table(args.results, args.against) if args.against else study_table(args.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
