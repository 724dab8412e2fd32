"""Would another decision threshold make the SZTAKI models better? Validation scenes only.

    python examples/probes/threshold_probe.py runs/reproduce/sztaki/seed1/teacher/best.h5 ...
    python examples/probes/threshold_probe.py --table [CHECKPOINT ...]

Evaluates each checkpoint on the validation scenes of ``--data`` (default the SZTAKI AirChange
scenes with the split of ``examples/reproduce.py``) as its run validated them: a teacher on the
clean pairs, a student on the pairs whose t2 is degraded by its setting (``DegradedView`` with the
run's ``val_seed``), each change map after the run's window mean (``filter_radius``), tiled as the
run's ``eval_tile``. It writes, per checkpoint, the pooled validation F1 (and precision and recall)
at each of the decision thresholds ``--thresholds`` (default the grid of the profile
``real-fc-siam-diff-calibrated``) and, at 0.5, each scene's F1, precision, recall
and the share of pixels labelled and predicted as change, to ``results/threshold_probe.json`` (rows
of a checkpoint already there are replaced). The test scenes are never evaluated. ``--table`` prints,
from the stored rows, each checkpoint's F1 at 0.5 and at its best threshold, and their mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core.data import Subset  # noqa: E402
from hicd_core.experiment import validation_view, write_json  # noqa: E402
from hicd_core.infer import best_threshold, threshold_metrics  # noqa: E402
from hicd_core.io import load_checkpoint  # noqa: E402
from hicd_core.metrics import ConfusionMatrix  # noqa: E402
from hicd_core.networks import load_model  # noqa: E402
from reproduce import PROFILES, folder_splits  # noqa: E402

#: The calibrated profile's grid, which these figures chose it for.
GRID = PROFILES["real-fc-siam-diff-calibrated"].threshold_grid


def scene_row(m):
    """F1, precision, recall (percent) and the labelled and predicted change shares of one confusion matrix."""
    total = m["tp"] + m["fp"] + m["fn"] + m["tn"]
    return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"],
            "label_pct": round(100.0 * (m["tp"] + m["fn"]) / total, 2),
            "pred_pct": round(100.0 * (m["tp"] + m["fp"]) / total, 2)}


def probe(path, val, thresholds, default_tile):
    """The row of one checkpoint: pooled validation metrics at each threshold, each scene's at 0.5."""
    model = load_model(path)[0]
    config = load_checkpoint(path)["config"]
    role = config.get("role", "teacher")
    view = validation_view(val, role, config.get("setting"))
    if role == "student" and config.get("val_seed") is not None and view.seed != config["val_seed"]:
        raise SystemExit(f"{path}: validated with val_seed {config['val_seed']}, this probe degrades with {view.seed}")
    kwargs = dict(batch_size=1, tile=config.get("eval_tile") or default_tile,
                  filter_radius=config.get("filter_radius", 0))
    # each scene predicted once at every threshold (and 0.5); the pooled metrics from the scenes' counts
    grid = sorted(set(thresholds) | {0.5})
    per_scene = [threshold_metrics(model, Subset(view, [i]), grid, **kwargs) for i in range(len(view))]
    pooled = {}
    for t in thresholds:
        cm = ConfusionMatrix()
        for m in per_scene:
            cm.tp, cm.fp, cm.fn, cm.tn = cm.tp + m[t]["tp"], cm.fp + m[t]["fp"], cm.fn + m[t]["fn"], cm.tn + m[t]["tn"]
        pooled[t] = cm.compute()
    scenes = {name: scene_row(m[0.5]) for name, m in zip(val.names, per_scene)}
    return {"checkpoint": str(path), "pairs": config["setting"] if role == "student" else "clean",
            "filter_radius": kwargs["filter_radius"],
            "val_f1_by_threshold": {str(t): m["f1"] for t, m in pooled.items()},
            "val_precision_recall_by_threshold": {str(t): [m["precision"], m["recall"]] for t, m in pooled.items()},
            "val_scenes_at_0.5": scenes}


def table(rows):
    """Per checkpoint: validation F1, precision and recall at 0.5, the best threshold and its F1; then per kind of
    pairs the mean ± std of F1 at 0.5 and at each checkpoint's best threshold."""
    lines = ["| checkpoint | pairs | F1 at 0.5 | precision / recall at 0.5 | best threshold | F1 there | gain |",
             "|---|---|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        f1 = {float(t): v for t, v in r["val_f1_by_threshold"].items()}
        if 0.5 not in f1:
            continue
        best = best_threshold(f1)
        p, rc = r.get("val_precision_recall_by_threshold", {}).get("0.5", ["–", "–"])
        lines.append(f"| {r['checkpoint']} | {r.get('pairs', 'clean')} | {f1[0.5]:.2f} | {p} / {rc} | {best:.2f} | "
                     f"{f1[best]:.2f} | {f1[best] - f1[0.5]:+.2f} |")
        groups.setdefault(r.get("pairs", "clean"), []).append((f1[0.5], f1[best]))
    lines += ["", "| pairs | checkpoints | F1 at 0.5 | F1 at the best threshold |", "|---|---:|---:|---:|"]
    sd = (lambda x: statistics.stdev(x) if len(x) > 1 else 0.0)  # noqa: E731
    for pairs, v in groups.items():
        at, best = [a for a, _ in v], [b for _, b in v]
        lines.append(f"| {pairs} | {len(v)} | {statistics.mean(at):.2f} ± {sd(at):.2f} | "
                     f"{statistics.mean(best):.2f} ± {sd(best):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(GRID))
    parser.add_argument("--results", default=str(ROOT / "results" / "threshold_probe.json"))
    parser.add_argument("--table", action="store_true", help="print the table of the stored rows (those of the "
                                                             "checkpoints named, or all) and stop")
    args = parser.parse_args(argv)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    if args.table:
        print(table([r for r in rows if not args.checkpoints or r["checkpoint"] in args.checkpoints]))
        return 0
    prof = PROFILES["real"]
    _, val, _, _, _ = folder_splits(args.data, prof)
    for path in args.checkpoints:
        row = probe(path, val, args.thresholds, prof.eval_tile)
        rows = [r for r in rows if r["checkpoint"] != path] + [row]
        write_json(results, rows)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
