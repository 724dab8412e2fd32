"""Is the converged protocol's student budget large enough? A student trained with a longer budget, validation only.

    python examples/probes/budget_probe.py --setting resolution-x8 --seed 0 --variant baseline --epochs 60
    python examples/probes/budget_probe.py --model fc-siam-diff --setting resolution-x4 --variant baseline

Trains one student of the converged protocol (``PROFILES["converged"]``, or its
``converged-<model>`` variant for ``--model`` other than the default: synthetic 64x64
scenes of ``--seed``, fresh initialisation, patience 8, cosine learning rate over the budget)
with a budget of ``--epochs`` instead of the protocol's 40, and appends its validation F1 per
epoch, best epoch and epochs run to ``results/budget_probe.json``. Only the validation set
is evaluated; the HiCD and feature-mse variants distil from the converged study's teacher of
that seed (``runs/reproduce/converged[-<model>]/seed<S>/teacher/best.h5``, trained by
``examples/reproduce.py --protocol converged [--model MODEL]``). Rows of another model than
the default carry a ``model`` field.
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
from hicd_core.data import load_splits  # noqa: E402
from hicd_core.experiment import PROFILES, run_summary, train_student, write_json  # noqa: E402
from hicd_core.networks import DEFAULT_MODEL, MODELS, load_model  # noqa: E402
import reproduce  # noqa: E402  (defines PROFILES["converged"], chooses the study)


def study(model):
    """``(runs/reproduce folder, profile name)`` of the converged study of ``model``, as
    ``examples/reproduce.py --protocol converged --model MODEL`` chooses them."""
    args = argparse.Namespace(model=model, protocol="converged", data=None, tag=None, profile=None)
    return reproduce.choose_study(args)[:2]


def row_key(row):
    return row.get("model", DEFAULT_MODEL), row["setting"], row["seed"], row["variant"], row["budget"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="resolution-x8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="baseline", choices=["baseline", "feature-mse", "hicd"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--out", default="runs/budget_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "budget_probe.json"))
    args = parser.parse_args(argv)
    backend.keep_host_memory()
    tag, profile = study(args.model)
    prof = replace(PROFILES[profile], student_epochs=args.epochs)
    splits = load_splits(None, size=prof.size, n_train=prof.n_train, n_val=prof.n_val, n_test=prof.n_test,
                         seed=args.seed)
    teacher = None
    if args.variant != "baseline":
        path = ROOT / "runs" / "reproduce" / tag / f"seed{args.seed}" / "teacher" / "best.h5"
        if not path.exists():
            parser.error(f"--variant {args.variant} distils from {path}, which does not exist: train it with "
                         f"examples/reproduce.py --protocol converged --model {args.model} --seeds {args.seed}")
        teacher = load_model(path)[0]
    model_part = "" if args.model == DEFAULT_MODEL else f"{args.model}-"
    folder = Path(args.out) / f"{model_part}{args.setting}-seed{args.seed}-{args.variant}-{args.epochs}"
    started = time.perf_counter()
    train_student(folder, args.variant, splits, prof, teacher, setting=args.setting, seed=args.seed,
                  student_init="fresh", progress=False)
    curve = [json.loads(line)["val"]["f1"] for line in (folder / "log.jsonl").read_text().splitlines() if line]
    model_field = {} if args.model == DEFAULT_MODEL else {"model": args.model}
    row = {**model_field, "setting": args.setting, "seed": args.seed, "variant": args.variant, "budget": args.epochs,
           **run_summary(folder), "best_val_f1": max(curve), "val_f1": curve,
           "seconds": round(time.perf_counter() - started, 1)}
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
    write_json(results, rows)
    print(json.dumps({k: v for k, v in row.items() if k != "val_f1"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
