"""How much of a checkpoint's validation F1 is its BatchNorm statistics? (issue 27; validation scenes only)

    python examples/probes/bn_probe.py runs/site_probe/all-seed0/best.h5 [--draws 3] [--batches 18]

A network trained with BatchNorm is validated with running statistics, ``R <- 0.9 R + 0.1 S`` after
each training batch, which the last ten or so batches dominate (docs/MATH.md 7.3) and which belong
to the weights as they were while training, not to an average of them (``ema``). The same weights
can therefore be validated with other statistics. This probe scores a checkpoint (``best.h5`` of a
teacher or a student of the SZTAKI studies, of ``site_probe.py`` or ``seed_probe.py``) on the validation
scenes of ``--data`` as its run validated them (a teacher on the clean pairs, a student with t2 degraded
by its setting; the split of ``examples/reproduce.py``, scored as a study scores a test scene, with the
profile's ``filter_radius``) three ways, weights fixed:

* ``saved``: the statistics in the checkpoint;
* ``running``: the saved statistics carried on through ``--batches`` more training batches at
  momentum 0.1, as one more epoch would leave them (``--draws`` draws of batches);
* ``precise``: the equal-weight mean over ``--batches`` training batches
  (``train.precise_statistics``; ``--draws`` draws).

Training batches are drawn as the checkpoint's run draws them (crops, flips, change-centred crops,
colour jitter, and a student's degraded t2) from generators seeded ``[99, draw]``: the same batches
for every checkpoint, whatever its seed. If the ``running`` figures spread by several
points, every epoch's validation F1 carries that lottery and the epoch selected as best is partly
the luckiest draw; the ``precise`` figures show what the weights give with statistics that do not
depend on the last batches. Rows (one per checkpoint, every figure) go to ``results/bn_probe.json``;
nothing is trained, no test scene is read. ``--seeds`` prints, for the student rows of ``--batches``
batches, the selected validation F1 and precision with the saved statistics and with the common
``precise`` ones (mean over the draws, and their range), one line per checkpoint, then how far the
students of ``--weak-seed`` trail the other seeds' with each (``reproduce.py`` checkpoints): whether
what sets a seed's students apart is in their weights or in the batches their statistics were
estimated on.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core import backend  # noqa: E402
from hicd_core.experiment import PROFILES, _base_config, validation_view, write_json  # noqa: E402
from hicd_core.networks import load_model  # noqa: E402
from hicd_core.train import _training_batches, precise_statistics  # noqa: E402
import reproduce  # noqa: E402


def carried_on(model, batches, count):
    """The model's running statistics after ``count`` more batches at its own momentum (its buffers kept)."""
    return precise_statistics(model, batches, count, xp=model.xp, seed=99, momentum=model.bn_momentum)


def scored(model, buffers, val, prof):
    kept, model.buffers = model.buffers, buffers
    try:
        pooled, per_scene = reproduce.evaluate_scenes(model, val, prof)
    finally:
        model.buffers = kept
    return {"f1": round(pooled["f1"], 2), "precision": round(pooled["precision"], 2),
            "recall": round(pooled["recall"], 2), "per_scene": {k: round(v, 2) for k, v in per_scene.items()}}


def run_views(config, prof, val):
    """``(TrainConfig whose batches to draw, validation pairs, role, setting)`` of a checkpoint's run
    (its saved ``config``): a student's batches and validation pairs carry t2 degraded by its setting."""
    role, setting = config.get("role", "teacher"), config.get("setting")
    cfg = _base_config(prof, 0)
    if role == "student":
        cfg = replace(cfg, role="student", setting=setting)
    return cfg, validation_view(val, role, setting), role, setting


def probe(path, args):
    prof = PROFILES[args.profile]
    train, val, _, _, _ = reproduce.folder_splits(args.data, prof, out=None, seed=0)
    model, ck = load_model(path)
    cfg, val, role, setting = run_views(ck.get("config") or {}, prof, val)
    row = {"checkpoint": str(path), "profile": args.profile, "batches": args.batches, "role": role,
           **({"setting": setting} if role == "student" else {}),
           "saved": scored(model, model.buffers, val, prof), "running": [], "precise": []}
    print(path, "saved", json.dumps(row["saved"]), flush=True)
    for draw in range(args.draws):
        for kind in ("precise",) if args.precise_only else ("running", "precise"):
            batches = _training_batches(cfg, train, backend.host_rng([99, draw]))
            buffers = (carried_on(model, batches, args.batches) if kind == "running"
                       else precise_statistics(model, batches, args.batches, xp=model.xp, seed=99))
            row[kind].append(scored(model, buffers, val, prof))
            print(path, kind, draw, json.dumps(row[kind][-1]), flush=True)
    return row


def table(rows):
    """Markdown: per checkpoint, the pooled validation F1 with its saved statistics, and the range and mean
    of the other draws."""
    lines = ["| checkpoint | saved | running: draws (mean) | precise: draws (mean) |", "|---|---:|---:|---:|"]
    for r in rows:
        cells = []
        for kind in ("running", "precise"):
            f1s = [d["f1"] for d in r[kind]]
            cells.append(", ".join(f"{v:.2f}" for v in f1s) + f" ({statistics.mean(f1s):.2f})")
        lines.append(f"| `{r['checkpoint']}` | {r['saved']['f1']:.2f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def seeds_table(rows):
    """Markdown: per student checkpoint, validation F1 and precision with its saved statistics and with the
    common precise ones (mean over the draws, and the range of F1 over the draws)."""
    lines = ["| checkpoint | setting | batches | saved F1 (precision) | common precise F1 (precision), mean "
             "| range over draws | change |", "|---|---|---:|---:|---:|---:|---:|"]
    ranges = []
    for r in rows:
        if r.get("role") != "student" or not r["precise"]:
            continue
        f1s = [d["f1"] for d in r["precise"]]
        f1, precision = statistics.mean(f1s), statistics.mean(d["precision"] for d in r["precise"])
        ranges.append(max(f1s) - min(f1s))
        lines.append(f"| `{r['checkpoint']}` | {r['setting']} | {r['batches']} | {r['saved']['f1']:.2f} "
                     f"({r['saved']['precision']:.2f}) | {f1:.2f} ({precision:.2f}) | {ranges[-1]:.2f} "
                     f"| {f1 - r['saved']['f1']:+.2f} |")
    if ranges:
        lines += ["", f"range of F1 over the draws, mean over {len(ranges)} checkpoint(s): "
                      f"{statistics.mean(ranges):.2f}"]
    return "\n".join(lines)


STUDY_RUN = re.compile(r"seed(\d+)/([^/]+)/student-([^/]+)/[^/]+\.h5$")  # a reproduce.py student's checkpoint


def weak_seed_gap(rows, weak):
    """Lines: per setting and variant of the ``reproduce.py`` student rows, the mean validation F1 of the other
    seeds minus seed ``weak``'s, with the saved statistics and with the common precise ones (mean over the
    draws), then both averaged over the variants that have seed ``weak`` and another seed."""
    groups = {}
    for r in rows:
        found = STUDY_RUN.search(r["checkpoint"])
        if r.get("role") == "student" and r["precise"] and found:
            seed, setting, variant = int(found[1]), found[2], found[3]
            common = statistics.mean(d["f1"] for d in r["precise"])
            groups.setdefault((setting, variant), {})[seed] = (r["saved"]["f1"], common)
    lines, gaps = [], {}
    for (setting, variant), by_seed in sorted(groups.items()):
        others = [v for s, v in by_seed.items() if s != weak]
        if weak not in by_seed or not others:
            continue
        saved = statistics.mean(v[0] for v in others) - by_seed[weak][0]
        common = statistics.mean(v[1] for v in others) - by_seed[weak][1]
        gaps.setdefault(setting, []).append((saved, common))
        lines.append(f"{setting} {variant}: seeds {sorted(s for s in by_seed if s != weak)} minus seed {weak}: "
                     f"saved {saved:+.2f}, common {common:+.2f}")
    for setting, pairs in sorted(gaps.items()):
        saved, common = (statistics.mean(p[i] for p in pairs) for i in (0, 1))
        lines.append(f"{setting}, mean over {len(pairs)} variant(s): D_saved {saved:+.2f}, D_common {common:+.2f}, "
                     f"D_common / D_saved {common / saved:.2f}" if saved else
                     f"{setting}, mean over {len(pairs)} variant(s): D_saved {saved:+.2f}, D_common {common:+.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--batches", type=int, default=18, help="training batches per estimate (default 18, "
                        "one epoch of the SZTAKI teachers)")
    parser.add_argument("--profile", default="real-fc-siam-diff-filtered", choices=sorted(PROFILES))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--results", default=str(ROOT / "results" / "bn_probe.json"))
    parser.add_argument("--table", action="store_true", help="print the rows as the notes' table and stop")
    parser.add_argument("--seeds", action="store_true", help="print the student rows, saved against common "
                        "statistics (rows of --batches batches), and how far seed --weak-seed's students trail "
                        "the others' with each, and stop")
    parser.add_argument("--precise-only", action="store_true", help="draw no running statistics (their "
                        "momentum forgets all but the last batches of a long estimate)")
    parser.add_argument("--weak-seed", type=int, default=3, help="the seed --seeds sets against the others")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.table or args.seeds:
        if not results.is_file():
            raise SystemExit(f"bn_probe: no rows at {results}")
        rows = json.loads(results.read_text())
        if args.seeds:  # rows of one estimate size
            rows = [r for r in rows if r["batches"] == args.batches]
        print(table(rows) if args.table else seeds_table(rows) + "\n\n" + weak_seed_gap(rows, args.weak_seed))
        return
    if not args.checkpoints:
        parser.error("give one or more checkpoints (or --table)")
    if args.draws < 1 or args.batches < 1:
        parser.error("--draws and --batches must be positive")
    backend.keep_host_memory()
    for path in args.checkpoints:
        row = probe(Path(path), args)
        rows = [r for r in (json.loads(results.read_text()) if results.exists() else [])
                if (r["checkpoint"], r["profile"], r["batches"]) != (row["checkpoint"], row["profile"], row["batches"])]
        write_json(results, rows + [row])


if __name__ == "__main__":
    main()
