"""Would another decision threshold make the SZTAKI teachers better? Validation scenes only.

    python examples/probes/threshold_probe.py runs/reproduce/sztaki/seed1/teacher/best.h5 ...

Evaluates each checkpoint (clean pairs, as the teacher HQ/HQ rows) on the validation
scenes of ``--data`` (default the SZTAKI AirChange scenes with the split of
``examples/reproduce.py``) at the decision thresholds ``--thresholds`` and writes, per
checkpoint, the pooled validation F1 at each threshold and, at 0.5, each scene's F1,
precision, recall and the share of pixels labelled and predicted as change, to
``results/threshold_probe.json`` (rows of a checkpoint already there are replaced). The
test scenes are never evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core import backend  # noqa: E402
from hicd_core.experiment import write_json  # noqa: E402
from hicd_core.infer import predict_probability  # noqa: E402
from hicd_core.networks import load_model  # noqa: E402
from hicd_core.metrics import ConfusionMatrix  # noqa: E402
from reproduce import PROFILES, folder_splits  # noqa: E402


def metrics_at(threshold, scenes):
    """Metrics of one confusion matrix over ``scenes`` (pairs of probability and label) at ``threshold``."""
    cm = ConfusionMatrix()
    for prob, label in scenes:
        cm.update(prob >= threshold, label)
    return cm.compute()


def scene_row(m):
    """F1, precision, recall (percent) and the labelled and predicted change shares of one confusion matrix."""
    total = m["tp"] + m["fp"] + m["fn"] + m["tn"]
    return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"],
            "label_pct": round(100.0 * (m["tp"] + m["fn"]) / total, 2),
            "pred_pct": round(100.0 * (m["tp"] + m["fp"]) / total, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--results", default=str(ROOT / "results" / "threshold_probe.json"))
    args = parser.parse_args(argv)
    prof = PROFILES["real"]
    _, val, _, _, _ = folder_splits(args.data, prof)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    tile = prof.eval_tile
    for path in args.checkpoints:
        model = load_model(path)[0]
        # each scene predicted once, as hicd_core.infer.evaluate tiles it; thresholds applied after
        probs = []
        for i in range(len(val)):
            t1, t2, label = val[i]
            prob = predict_probability(model, t1, t2, tile=tile, overlap=min(32, tile // 4))
            probs.append((prob, backend.from_host(label, model.xp)))
        pooled = {str(t): metrics_at(t, probs)["f1"] for t in args.thresholds}
        scenes = {name: scene_row(metrics_at(0.5, [pair])) for name, pair in zip(val.names, probs)}
        row = {"checkpoint": path, "val_f1_by_threshold": pooled, "val_scenes_at_0.5": scenes}
        rows = [r for r in rows if r["checkpoint"] != path] + [row]
        write_json(results, rows)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
