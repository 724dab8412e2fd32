"""What does a student's seed fix on the SZTAKI validation scenes: its initial weights or its data? (issue 27, item 3)

    python examples/probes/seed_probe.py --setting resolution-x4 --data-seed 0 --init-seed 3
    python examples/probes/seed_probe.py --setting resolution-x4 --data-seed 3 --init-seed 3 --set precise_bn=144
    python examples/probes/seed_probe.py --table

A student of the SZTAKI studies draws everything from its seed: its initial weights, the order and
placement of its training crops, their flips, colour jitter and degradations. In the precise study
(``results/sztaki-fc-siam-diff-precise.json``) the seed moves a student more than its loss does, and
a seed's students of every loss move together. This probe trains the study's fresh baseline student
(profile ``real-fc-siam-diff-precise``, the split of ``examples/reproduce.py``, one quality setting)
with the initial weights of one seed and the data of another (``TrainConfig.init_seed``), and appends
its validation F1 per epoch to ``results/seed_probe.json``. Only the validation scenes are read.

``--table`` sets each pair of seeds out as a 2 x 2 table of selected validation F1 (initial weights
by rows, data by columns): the diagonal is the study's own students (``--study``; a run with
``init_seed`` equal to its seed is that run, bit for bit), the other cells this probe's rows. The
effect of the initial weights is the mean over both data seeds of F1(init a) - F1(init b), the effect
of the data the mean over both initial weights of F1(data a) - F1(data b); each cell also gives the
epoch of the best validation F1 and the F1 at the last epoch.

``--set FIELD=VALUE`` changes a field of the profile (``experiment.Profile``, values as JSON) for one
run, which may then keep its seed's own weights (``--init-seed`` equal to ``--data-seed``); ``--table``
lists such runs after the 2 x 2 tables, each beside the study's student of its seed and setting.
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
from hicd_core.experiment import PROFILES, train_student, write_json  # noqa: E402
import reproduce  # noqa: E402
from site_probe import fields  # noqa: E402

PROFILE = "real-fc-siam-diff-precise"
STUDY = ROOT / "results" / "sztaki-fc-siam-diff-precise.json"


def run(args):
    changes = fields(args.set)
    if args.data_seed == args.init_seed and not changes:
        raise SystemExit(f"seed_probe: --init-seed {args.init_seed} equals --data-seed: that run is the study's "
                         f"own student (its row in {STUDY.name})")
    if args.setting not in reproduce.SETTINGS:
        raise SystemExit(f"seed_probe: unknown setting {args.setting!r}; choose one of {list(reproduce.SETTINGS)}")
    try:
        prof = replace(PROFILES[PROFILE], **changes)
    except TypeError as err:
        raise SystemExit(f"seed_probe: --set {args.set}: {err}") from None
    if not Path(args.data).is_dir():
        raise SystemExit(f"seed_probe: no data folder at {args.data}")
    backend.keep_host_memory()
    train, val, _, described, _ = reproduce.folder_splits(args.data, prof, out=None, seed=0)
    out = Path(args.out) / (f"{args.setting}-data{args.data_seed}-init{args.init_seed}"
                            + "".join(f"-{k}{v}" for k, v in changes.items()))
    started = time.perf_counter()
    train_student(out, "baseline", (train, val), prof, None, setting=args.setting, seed=args.data_seed,
                  student_init="fresh", init_seed=None if args.init_seed == args.data_seed else args.init_seed,
                  progress=False)
    summary = reproduce._summary(out)
    row = {"setting": args.setting, "variant": "baseline", "data_seed": args.data_seed, "init_seed": args.init_seed,
           "profile": PROFILE, **({"set": changes} if changes else {}), "split": described,
           "val_f1": summary["val_f1"], "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
           "host": reproduce.machine_description("numpy"),
           "seconds": round(time.perf_counter() - started, 1)}
    results = Path(args.results)
    rows = [r for r in (json.loads(results.read_text()) if results.exists() else []) if key(r) != key(row)]
    write_json(results, rows + [row])
    print(json.dumps(row))


def key(r):
    return r["setting"], r["variant"], r["data_seed"], r["init_seed"], r["profile"], json.dumps(r.get("set"))


def cell(curve, best_epoch):
    """``(selected F1, best epoch, last F1)`` of a validation curve."""
    return curve[best_epoch - 1], best_epoch, curve[-1]


def table(rows, study_rows):
    """The 2 x 2 table of every pair of seeds that this probe mixed, with the two effects."""
    own = {(r["setting"], r["seed"]): cell(r["val_f1"], r["best_epoch"]) for r in study_rows
           if r["method"] == "student baseline" and r.get("init", "fresh") == "fresh"}
    mixed = {(r["setting"], r["init_seed"], r["data_seed"]): cell(r["val_f1"], r["best_epoch"]) for r in rows
             if not r.get("set")}
    pairs = sorted({(s, min(i, d), max(i, d)) for s, i, d in mixed})
    lines = []
    for setting, a, b in pairs:
        def at(i, d):
            return own.get((setting, i)) if i == d else mixed.get((setting, i, d))
        cells = {(i, d): at(i, d) for i in (a, b) for d in (a, b)}
        lines += [f"{setting}, seeds {a} and {b}: selected validation F1 (best epoch, last-epoch F1)", "",
                  f"| initial weights | data of seed {a} | data of seed {b} |", "|---|---:|---:|"]
        for i in (a, b):
            shown = [("–" if c is None else f"{c[0]:.2f} ({c[1]}, {c[2]:.2f})") for c in (cells[i, a], cells[i, b])]
            lines.append(f"| seed {i} | {shown[0]} | {shown[1]} |")
        if all(c is not None for c in cells.values()):
            f = {k: c[0] for k, c in cells.items()}
            init = (f[a, a] + f[a, b] - f[b, a] - f[b, b]) / 2
            data = (f[a, a] + f[b, a] - f[a, b] - f[b, b]) / 2
            lines += ["", f"effect of the initial weights (seed {a} - seed {b}): {init:+.2f}; "
                          f"effect of the data (seed {a} - seed {b}): {data:+.2f}"]
        lines.append("")
    changed = [r for r in rows if r.get("set")]
    if changed:
        lines += ["runs with a changed profile: selected validation F1 (best epoch, last-epoch F1)", "",
                  "| setting | weights / data | change | this run | the study's student of the seed |",
                  "|---|---|---|---:|---:|"]
        for r in changed:
            mine = cell(r["val_f1"], r["best_epoch"])
            study = own.get((r["setting"], r["data_seed"])) if r["init_seed"] == r["data_seed"] else None
            what = ", ".join(f"{k} {v}" for k, v in r["set"].items())
            shown = [f"{c[0]:.2f} ({c[1]}, {c[2]:.2f})" if c else "–" for c in (mine, study)]
            lines.append(f"| {r['setting']} | {r['init_seed']} / {r['data_seed']} | {what} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines).rstrip() if lines else "seed_probe: no rows yet"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="resolution-x4")
    parser.add_argument("--data-seed", type=int, default=0, help="the seed of the batches (TrainConfig.seed)")
    parser.add_argument("--init-seed", type=int, default=3, help="the seed of the initial weights")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--out", default="runs/seed_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "seed_probe.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="profile fields to change, values as JSON (precise_bn=144)")
    parser.add_argument("--study", default=str(STUDY), help="the study whose students fill the table's diagonal")
    parser.add_argument("--table", action="store_true", help="print the 2 x 2 tables and stop")
    args = parser.parse_args(argv)
    if args.table:
        for path in (args.results, args.study):
            if not Path(path).is_file():
                raise SystemExit(f"seed_probe: no rows at {path}")
        print(table(json.loads(Path(args.results).read_text()), json.loads(Path(args.study).read_text())))
        return
    run(args)


if __name__ == "__main__":
    main()
