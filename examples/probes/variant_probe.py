"""Why does HiCD not beat a converged baseline? One HiCD variant of the converged protocol, validation only.

    python examples/probes/variant_probe.py --setting resolution-x8 --seed 2 --variant cosine

Trains one fresh student of the converged protocol (``PROFILES["converged"]``: synthetic
64x64 scenes of ``--seed``, patience 8 within 40 epochs, cosine learning rate) with the
HiCD loss changed as ``--variant`` says (``VARIANTS`` below: a term left out, another
temperature or weight, the decayed weight of docs/MATH.md section 9), distilling from the
converged study's teacher of that seed (``runs/reproduce/converged/seed<S>/teacher/best.h5``,
trained by ``examples/reproduce.py --protocol converged``), and appends its validation F1 per
epoch, best validation F1, best epoch and epochs run to ``results/variant_probe.json``. Only
the validation set is evaluated; the study's own baseline and HiCD students of that seed
and setting are the reference (their best validation F1, from their rows in
``results/converged.json``, is recorded beside the variant's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core import backend  # noqa: E402
from hicd_core.data import load_splits  # noqa: E402
from hicd_core.experiment import PROFILES, run_summary, train_student, write_json  # noqa: E402
from hicd_core.networks import load_model  # noqa: E402
import reproduce  # noqa: E402,F401  (defines PROFILES["converged"])

#: name -> DistillConfig overrides of the HiCD student (SPEC 2 defaults otherwise)
VARIANTS = {
    "cosine": {"weight_schedule": "cosine"},
    "no-global": {"w_global": 0.0},
    "self-only": {"w_cross": 0.0, "w_global": 0.0},
    "no-change": {"use_change": False},
    "tau-1": {"tau": 1.0},
    "tau-0.25": {"tau": 0.25},
    "weight-2": {"weight": 2.0},
    "weight-0.5": {"weight": 0.5},
}


def reference_best_val_f1(setting, seed):
    """Best validation F1 of the converged study's fresh baseline and HiCD students (``results/converged.json``)."""
    rows = json.loads((ROOT / "results" / "converged.json").read_text())
    out = {}
    for method in ("student baseline", "student HiCD full"):
        for r in rows:
            if (r["setting"], r["seed"], r["method"], r.get("init", "fresh")) == (setting, seed, method, "fresh") \
                    and r.get("val_f1"):
                out[method] = max(r["val_f1"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="resolution-x8")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--out", default="runs/variant_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "variant_probe.json"))
    args = parser.parse_args(argv)
    backend.keep_host_memory()
    prof = PROFILES["converged"]
    splits = load_splits(None, size=prof.size, n_train=prof.n_train, n_val=prof.n_val, n_test=prof.n_test,
                         seed=args.seed)
    study = ROOT / "runs" / "reproduce" / "converged" / f"seed{args.seed}"
    teacher = load_model(study / "teacher" / "best.h5")[0]
    folder = Path(args.out) / f"{args.setting}-seed{args.seed}-{args.variant}"
    started = time.perf_counter()
    train_student(folder, "hicd", splits, prof, teacher, setting=args.setting, seed=args.seed,
                  student_init="fresh", distill_overrides=VARIANTS[args.variant], progress=False)
    curve = [json.loads(line)["val"]["f1"] for line in (folder / "log.jsonl").read_text().splitlines() if line]
    row = {"setting": args.setting, "seed": args.seed, "variant": args.variant, "overrides": VARIANTS[args.variant],
           **run_summary(folder), "best_val_f1": max(curve), "val_f1": curve,
           "reference_best_val_f1": reference_best_val_f1(args.setting, args.seed),
           "seconds": round(time.perf_counter() - started, 1)}
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.exists() else []
    rows = [r for r in rows if (r["setting"], r["seed"], r["variant"]) != (row["setting"], row["seed"], row["variant"])]
    write_json(results, rows + [row])
    print(json.dumps({k: v for k, v in row.items() if k != "val_f1"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
