"""One teacher per site, or another single change to the study's teacher, on the SZTAKI validation scenes (#27).

    python examples/probes/site_probe.py --site all --seed 0
    python examples/probes/site_probe.py --site szada --seed 0
    python examples/probes/site_probe.py --site tiszadob --seed 0 [--min-epochs 40]
    python examples/probes/site_probe.py --site all --seed 0 --budget 3
    python examples/probes/site_probe.py --site all --seed 0 --set pos_weight=auto
    python examples/probes/site_probe.py --site all --seed 0 --repeats 4 --set crop=256 batch_size=2
    python examples/probes/site_probe.py --table
    python examples/probes/site_probe.py --curves results/sztaki-fc-siam-diff-filtered.json

The SZTAKI studies train one network on the nine training scenes of both sites (Szada,
Tiszadob, and the `archieve` pair). Public reimplementations of the literature's AirChange
protocol train one network per site instead, on that site's other scenes, for many more crops.
Which gives the stronger teacher here is a recipe question, so it is answered on the validation
scenes alone: ``--site all`` trains the study's own teacher (``PROFILES[--profile]``, the split of
``examples/reproduce.py``, seeded as ``reproduce.py`` seeds it, so its validation curve is the
committed row's); ``--site NAME`` trains the same recipe on the training scenes whose name starts
with NAME and validates on that site's validation scene, with the crops per scene and epoch
raised so that an epoch has as many steps as the joint teacher's (the same budget of updates).
``--budget K`` draws K times as many crops per epoch (a longer schedule), ``--repeats N`` sets the
crops per scene and epoch, ``--min-epochs N`` and ``--set FIELD=VALUE`` change ``TrainConfig`` fields.

Each run's selected model (``best.h5``) is then scored on every validation scene of its site by
itself, as the studies score a test scene (``reproduce.evaluate_scenes``, with the profile's
``filter_radius``), and a row goes to ``results/site_probe.json``. ``--table`` prints each run's
selected validation F1 and its F1 per validation scene beside those of the study's teacher of the
same seed (the ``--site all`` run with nothing changed); ``--curves [STUDY.json ...]`` prints the shape of
each validation curve of the joint teachers here and of the given studies' teachers (when it first
reaches 30, its best, and its mean jump from one epoch to the next after epoch 10). No test scene is read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core import backend  # noqa: E402
from hicd_core.data import Repeat, Subset  # noqa: E402
from hicd_core.experiment import PROFILES, _base_config, write_json  # noqa: E402
from hicd_core.networks import load_model  # noqa: E402
from hicd_core.train import fit  # noqa: E402
import reproduce  # noqa: E402
from recipe_probe import mean_jump  # noqa: E402

DEFAULT_PROFILE = "real-fc-siam-diff-filtered"  # the study whose teachers the probe was written for


def site_splits(data, prof, site, budget=1):
    """``(train, val, description)``: all training scenes (``site`` 'all') or those of one site,
    ``budget`` times as many crops per epoch as the joint teacher of ``prof`` draws."""
    train, val, _, described, _ = reproduce.folder_splits(data, prof, out=None, seed=0)
    scenes = train.dataset  # the Subset of training scenes that Repeat shows prof.repeats times
    if site == "all":
        if budget == 1:
            return train, val, described
        return Repeat(scenes, prof.repeats * budget), val, f"{described}, {prof.repeats * budget} crops each per epoch"
    keep = [i for i, name in enumerate(scenes.names) if name.startswith(site)]
    keep_val = [i for i, name in enumerate(val.names) if name.startswith(site)]
    if not keep or not keep_val:
        raise SystemExit(f"site_probe: no training or validation scene of {data} starts with {site!r} "
                         f"(training {scenes.names}, validation {val.names})")
    # as many crops per epoch as the joint teacher draws, so that both get the same number of updates
    repeats = math.ceil(len(scenes) * prof.repeats * budget / len(keep))
    site_train = Repeat(Subset(scenes, keep), repeats)
    site_val = Subset(val, keep_val)
    return site_train, site_val, (f"site {site!r}: training {site_train.dataset.names} ({repeats} crops each per "
                                  f"epoch), validation {site_val.names}")


def run(args):
    backend.keep_host_memory()
    prof = PROFILES[args.profile]
    if args.repeats is not None:
        if args.repeats < 1:
            raise SystemExit(f"site_probe: --repeats must be a positive integer, got {args.repeats}")
        prof = replace(prof, repeats=args.repeats)
    if args.budget < 1:
        raise SystemExit(f"site_probe: --budget must be a positive integer, got {args.budget}")
    train, val, described = site_splits(args.data, prof, args.site, args.budget)
    cfg = _base_config(prof, args.seed)
    if args.min_epochs is not None:
        cfg = replace(cfg, min_epochs=args.min_epochs)
    changes = fields(args.set)
    try:
        cfg = replace(cfg, **changes)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"site_probe: --set {args.set}: {err}") from None
    out = Path(args.out) / (f"{args.site}-seed{args.seed}" + (f"-budget{args.budget}" if args.budget > 1 else "")
                            + (f"-min{args.min_epochs}" if args.min_epochs is not None else "")
                            + (f"-repeats{args.repeats}" if args.repeats is not None else "")
                            + "".join(f"-{k}{v}" for k, v in changes.items()))
    started = time.perf_counter()
    print(f"site_probe: {described}; {cfg.epochs} epochs, out {out}", flush=True)
    result = fit(cfg, train, val, out, resume=True, progress=False,
                 on_epoch=lambda r: print(r["epoch"], round(r["val"]["f1"], 2), flush=True))
    model = load_model(out / "best.h5")[0]
    _, per_scene = reproduce.evaluate_scenes(model, val, prof)
    curve = [round(r["val"]["f1"], 2) for r in result.history]
    train_loss = [round(r["train"]["loss"], 4) for r in result.history]  # is the teacher still fitting its crops?
    row = {"site": args.site, "seed": args.seed, "budget": args.budget, "profile": args.profile, "split": described,
           "crops_per_scene": train.times, "min_epochs": cfg.min_epochs, **({"set": changes} if changes else {}),
           "val_f1": curve, "train_loss": train_loss,
           "val_f1_per_scene": {k: round(v, 2) for k, v in per_scene.items()},
           "seconds": round(time.perf_counter() - started, 1)}
    results = Path(args.results)
    rows = [r for r in (json.loads(results.read_text()) if results.exists() else [])
            if key(r) != key(row)]
    write_json(results, rows + [row])
    print(json.dumps(row))


def key(r):
    return r["site"], r["seed"], r["budget"], r["profile"], r["min_epochs"], json.dumps(r.get("set")), \
        r["crops_per_scene"]


def fields(pairs):
    """``{"pos_weight": 16.0}`` from ``["pos_weight=16"]``: TrainConfig fields, each value as JSON (else a string)."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"site_probe: --set wants FIELD=VALUE, got {pair!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def changes(r):
    """What a row changed from the study's teacher, as a list of words ([] for the study's teacher itself)."""
    prof = PROFILES.get(r["profile"])
    out = [] if r["site"] == "all" else [f"{r['site']} only"]
    if r["budget"] != 1:
        out.append(f"{r['budget']} x the crops")
    elif r["site"] == "all" and prof is not None and r["crops_per_scene"] != prof.repeats:
        out.append(f"{r['crops_per_scene']} crops per scene")
    if prof is not None and r["min_epochs"] != prof.min_epochs:
        out.append(f"min_epochs {r['min_epochs']}")
    return out + [f"{k} {v}" for k, v in (r.get("set") or {}).items()]


def label(r):
    """What a run is, in words; a profile other than the default is named, so that the summary never pairs
    a change made to one profile's teacher with the same change made to another's."""
    other = [] if r["profile"] == DEFAULT_PROFILE else [f"profile {r['profile']}"]
    return ", ".join(["both sites"] * (r["site"] == "all") + changes(r) + other)


def table(rows):
    """Markdown: per run and validation scene, its selected model's F1 beside the study's own teacher's
    (both sites, nothing changed, the same seed and profile), then each change's difference over seeds."""
    joint = {(r["seed"], r["profile"]): r for r in rows if not changes(r)}
    lines = ["| seed | teacher | crops per epoch | best epoch / run | selected validation F1 (study's teacher) "
             "| validation scene | F1 | study's teacher | difference |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in sorted((r for r in rows if changes(r)), key=lambda r: (r["seed"], r["site"] != "all", r["site"],
                                                                     r["budget"])):
        both = joint.get((r["seed"], r["profile"]))
        who = label(r)
        curve = r["val_f1"]
        best = f"{curve.index(max(curve)) + 1} / {len(curve)}"
        selected = f"{max(curve):.2f}" + (f" ({max(both['val_f1']):.2f})" if both and r["site"] == "all" else "")
        for scene, f1 in r["val_f1_per_scene"].items():
            other = both["val_f1_per_scene"].get(scene) if both else None
            diff = f"{f1 - other:+.2f}" if other is not None else "–"
            shown = f"{other:.2f}" if other is not None else "–"
            lines.append(f"| {r['seed']} | {who} | {r['crops_per_scene']} per scene | {best} | {selected} | {scene} "
                         f"| {f1:.2f} | {shown} | {diff} |")
    return "\n".join(lines + [""] + summary(rows, joint))


def summary(rows, joint):
    """Markdown: per change, its difference from the study's teacher paired by seed, with a 95 % interval
    (t over seeds): the selected validation F1 for a teacher of both sites, its scene's F1 for a site teacher."""
    groups = {}
    for r in rows:
        both = joint.get((r["seed"], r["profile"]))
        if both is None or not changes(r):
            continue
        if r["site"] == "all":
            diff = max(r["val_f1"]) - max(both["val_f1"])
        else:
            (scene, f1), = r["val_f1_per_scene"].items()
            diff = f1 - both["val_f1_per_scene"][scene]
        groups.setdefault(label(r), []).append((r["seed"], diff))
    lines = ["| teacher | seeds | difference from the study's teacher (95 % interval) |", "|---|---|---:|"]
    for what, pairs in groups.items():
        diffs = [d for _, d in pairs]
        ci = reproduce.t_interval(diffs) if len(diffs) > 1 else None
        span = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        lines.append(f"| {what} | {', '.join(str(s) for s, _ in pairs)} | {sum(diffs) / len(diffs):+.2f}{span} |")
    return lines


def curves(rows, studies=()):
    """Markdown: per joint teacher of the rows (and each study's teacher rows), its validation curve's
    first epoch at F1 >= 30, its best and when, and its mean jump after epoch 10 (``recipe_probe.mean_jump``)."""
    runs = [(f"site_probe: {label(r)}", r["seed"], r["val_f1"]) for r in rows if r["site"] == "all"]
    for path in studies:
        runs += [(f"{Path(path).stem}: teacher", r["seed"], r["val_f1"]) for r in json.loads(Path(path).read_text())
                 if r["method"] == "teacher HQ/HQ" and r["setting"] == "resolution-x4"]  # one row per teacher
    lines = ["| teacher | seed | first epoch >= 30 | best / at epoch / run | mean jump after epoch 10 |",
             "|---|---:|---:|---:|---:|"]
    for what, seed, curve in sorted(runs, key=lambda t: (t[0], t[1])):
        first = next((i + 1 for i, v in enumerate(curve) if v >= 30), "–")
        jump = mean_jump(curve)
        lines.append(f"| {what} | {seed} | {first} | {max(curve):.2f} / {curve.index(max(curve)) + 1} / {len(curve)} "
                     f"| {'–' if jump is None else f'{jump:.2f}'} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="all", help="'all' (both sites), or a scene-name prefix: szada, tiszadob")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=1,
                        help="crops per epoch, as a multiple of the study teacher's (a longer schedule)")
    parser.add_argument("--min-epochs", type=int, default=None,
                        help="early stopping not before this many epochs (default: the profile's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other TrainConfig fields to change, values as JSON (pos_weight=16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="crops per training scene and epoch before --budget (default: the profile's)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--out", default="runs/site_probe")
    parser.add_argument("--results", default=str(ROOT / "results" / "site_probe.json"))
    parser.add_argument("--table", action="store_true", help="print the rows as the notes' table and stop")
    parser.add_argument("--curves", nargs="*", default=None, metavar="STUDY",
                        help="print the shape of the joint teachers' validation curves (and of these studies' "
                             "teachers) and stop")
    args = parser.parse_args(argv)
    if args.table or args.curves is not None:
        for path in [args.results, *(args.curves or [])]:
            if not Path(path).is_file():
                raise SystemExit(f"site_probe: no rows at {path}")
        rows = json.loads(Path(args.results).read_text())
        print(table(rows) if args.table else curves(rows, args.curves))
        return
    run(args)


if __name__ == "__main__":
    main()
