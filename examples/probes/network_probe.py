"""Compare networks and their settings on the synthetic scenes' validation pairs (teachers, HQ/HQ).

    python examples/probes/network_probe.py NAME '{"model": "fc-siam-diff", "dropout": 0.0}'

Trains one teacher (seed 0) on 320 synthetic 64x64 pairs (scene seed 0) for ``epochs``
(default 8), batch 8, lr 2e-3, cosine, with the ``TrainConfig`` fields given as JSON, and
appends its validation F1 per epoch (64 pairs of scene seed 1000, the validation pairs of
the synthetic studies' first seed) to ``results/network_probe.json`` under NAME. No test
pair is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hicd_core import backend  # noqa: E402
from hicd_core.data import ArrayDataset, synthetic_pairs  # noqa: E402
from hicd_core.experiment import write_json  # noqa: E402
from hicd_core.train import TrainConfig, fit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("fields", nargs="?", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--out", default="runs/network_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "network_probe.json"))
    args = parser.parse_args(argv)
    backend.keep_host_memory()
    fields = json.loads(args.fields)
    epochs = fields.pop("epochs", 8)
    train = ArrayDataset(*synthetic_pairs(320, 64, seed=0))
    val = ArrayDataset(*synthetic_pairs(64, 64, seed=1000))
    started = time.perf_counter()
    result = fit(TrainConfig(role="teacher", epochs=epochs, seed=0, **fields), train, val, Path(args.out) / args.name,
                 progress=False)
    curve = [r["val"]["f1"] for r in result.history]
    print(args.name, fields, curve, flush=True)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    rows.append({"name": args.name, "fields": fields, "epochs": epochs, "val_f1": curve, "best_val_f1": max(curve),
                 "best_epoch": curve.index(max(curve)) + 1, "seconds": round(time.perf_counter() - started, 1)})
    write_json(results, rows)


if __name__ == "__main__":
    main()
