"""Probe a teacher recipe on a real folder's validation scenes (how docs/studies/sztaki_notes.md chose it).

    python examples/probes/recipe_probe.py NAME '{"normalize": true, "pos_weight": 5.0, "change_crop_rate": 0.5}'

Trains one teacher (seed 0) on the training scenes of ``--data`` (default the SZTAKI
AirChange scenes with the split of ``examples/reproduce.py``), random 128x128 crops,
16 per scene and epoch, batch 8, lr 2e-3, cosine over ``epochs`` (default 40), with
the ``TrainConfig`` fields given as JSON (which override those settings; ``repeats`` sets
the crops per scene and epoch, ``epochs`` the budget), and appends
its validation F1 per epoch to ``results/recipe_probe.json`` under NAME. Only validation scenes are evaluated.

    python examples/probes/recipe_probe.py --table [NAME ...]

prints the rows (all, or those named) as the Markdown table of the notes: best validation F1
and its epoch, the last epoch's, the mean over epochs 21-40 (the plateau after the peak) and
the mean absolute change from one epoch to the next after epoch 10 (how much of a lottery
picking the best epoch is).

    python examples/probes/recipe_probe.py --scenes NAME [NAME ...] [--out DIR]

evaluates each named probe's selected model (``DIR/NAME/best.h5``, the runs of ``--out``) on
every validation scene by itself and prints F1, precision and recall per scene: which scene
a recipe wins or loses on, and whether it misses change or over-calls it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core import backend  # noqa: E402
from hicd_core.experiment import PROFILES, write_json  # noqa: E402
from hicd_core.train import TrainConfig, fit  # noqa: E402
from reproduce import folder_splits  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("fields", nargs="?", help="TrainConfig fields as JSON")
    parser.add_argument("--table", nargs="*", metavar="NAME", help="print the rows (all, or NAME ...) and stop")
    parser.add_argument("--scenes", nargs="+", metavar="NAME",
                        help="print each named probe's validation F1, precision and recall per scene and stop")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--out", default="runs/recipe_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "recipe_probe.json"))
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(Path(args.results).read_text()), args.table))
        return
    if args.scenes:
        print(scene_table(args.scenes, args.data, Path(args.out)))
        return
    if args.name is None or args.fields is None:
        parser.error("NAME and FIELDS are needed to run a probe")
    backend.keep_host_memory()
    fields = json.loads(args.fields)
    epochs = fields.pop("epochs", 40)
    settings = dict(batch_size=8, crop=128, lr=2e-3, eval_tile=256, seed=0)  # the fields given override these
    config = {k: v for k, v in {**settings, **fields}.items() if k != "repeats"}  # repeats: crops per scene and epoch
    prof = replace(PROFILES["real"], repeats=fields.get("repeats", PROFILES["real"].repeats))
    train, val, _, described, _ = folder_splits(args.data, prof, out=Path(args.out), seed=0)
    cfg = TrainConfig(role="teacher", epochs=epochs, **config)
    curve, started = [], time.perf_counter()

    def on_epoch(r):
        curve.append(r["val"]["f1"])
        print(r["epoch"], round(r["train"]["loss"], 4), {k: r["val"][k] for k in ("f1", "precision", "recall")},
              flush=True)

    fit(cfg, train, val, Path(args.out) / args.name, progress=False, on_epoch=on_epoch)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    rows.append({"name": args.name, "fields": fields, "epochs": epochs, "split": described, "val_f1": curve,
                 "best_val_f1": max(curve), "best_epoch": curve.index(max(curve)) + 1,
                 "seconds": round(time.perf_counter() - started, 1)})
    write_json(results, rows)


# the recipe of the TinySiamCD studies (PROFILES["real"]); the table names only what a probe changes
REAL = {"normalize": True, "pos_weight": 5.0, "dice_weight": 1.0, "change_crop_rate": 0.5}


def mean_jump(curve, after=10):
    """The mean absolute change of validation F1 from one epoch to the next after epoch ``after`` (None if none)."""
    jumps = [abs(b - a) for a, b in zip(curve[after:], curve[after + 1:])]
    return sum(jumps) / len(jumps) if jumps else None


def table(rows, names=()):
    """The rows (those named, in the file's order; all without names) as a Markdown table."""
    lines = ["| probe | fields | best | at epoch | epochs | last | mean 21-40 | mean jump after 10 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if names and r["name"] not in names:
            continue
        v = r["val_f1"]
        plateau = f"{sum(v[20:40]) / len(v[20:40]):.2f}" if len(v) >= 40 else "-"
        jump = mean_jump(v)
        jump = "-" if jump is None else f"{jump:.2f}"
        missing = [k for k in REAL if k not in r["fields"]]
        changed = [f"{k} {v_}" for k, v_ in r["fields"].items() if REAL.get(k, object()) != v_]
        fields = ("none of `real`" if len(missing) == len(REAL) else
                  "`real`" + "".join(f", no {k}" for k in missing)) + "".join(f", {c}" for c in changed)
        lines.append(f"| `{r['name']}` | {fields} | {r['best_val_f1']:.2f} | {r['best_epoch']} | {len(v)} | "
                     f"{v[-1]:.2f} | {plateau} | {jump} |")
    return "\n".join(lines)


def scene_table(names, data, out):
    """Each probe's ``best.h5`` on every validation scene by itself, as a Markdown table."""
    from hicd_core.data import Subset
    from hicd_core.infer import evaluate
    from hicd_core.networks import load_model

    _, val, _, _, _ = folder_splits(data, PROFILES["real"], out=out, seed=0)
    lines = ["| probe | scene | F1 | precision | recall |", "|---|---|---:|---:|---:|"]
    for name in names:
        path = out / name / "best.h5"
        if not path.exists():
            raise SystemExit(f"recipe_probe: no selected model of probe {name!r} at {path}")
        model = load_model(path)[0]
        for i, scene in enumerate(val.names):
            r = evaluate(model, Subset(val, [i]), batch_size=1, tile=PROFILES["real"].eval_tile)
            lines.append(f"| `{name}` | {scene} | {r['f1']:.2f} | {r['precision']:.2f} | {r['recall']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
