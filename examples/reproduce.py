"""Does HiCD beat the baseline student? Every quality setting x seed x student variant, on held-out LQ test sets.

    python examples/reproduce.py                              # synthetic scenes, the 6-epoch sweep (resumable)
    python examples/reproduce.py --protocol converged         # synthetic, every model trained until it stops improving
    python examples/reproduce.py --data ../shared/data/sztaki-airchange --settings resolution-x4 multi
    python examples/reproduce.py --data path/to/any/A-B-label/folder --label-threshold 128
    python examples/reproduce.py --report-only                # rebuild the report and the plots
    python examples/reproduce.py --summary                    # the README's table over every study

For each seed one teacher is trained on HQ/HQ pairs (it does not depend on the
quality setting); then, for each setting, the rows ``teacher HQ/HQ``,
``teacher HQ/LQ`` and one row per student variant are evaluated on the same
held-out LQ test set (t2 of test sample ``i`` degraded with seed ``[54321 + seed, i]``).

Rows go to ``results/<study>.json`` as soon as each is measured: ``{setting,
method, seed, init, best_epoch, epochs_run, val_f1, f1, iou, precision, recall,
oa, kappa}`` (``init``: ``fresh`` or ``teacher``, how the students started;
``val_f1``: validation F1 per epoch; with ``--data`` also ``f1_per_scene``; ``host``: the
CPU the model was trained on, as ``machine`` in the meta file; ``teacher_best_val_f1``: for
students that used a teacher, that teacher's best validation F1, which tells a teacher
retrained on another host apart: the same seed and recipe give another model there).
Rows already there are skipped, so an interrupted run resumes where it stopped
(a finished model's checkpoint is reused when its folder still exists). The
report ``docs/studies/<study>.md`` and its plots (``docs/studies/images/``) are rebuilt after
every row; its hand-written part lives in ``docs/studies/<study>_notes.md``.

Studies (``--data`` and ``--protocol`` choose one):

* ``reproduce`` (synthetic, ``--protocol sweep``): 64x64 scenes, the same 6-epoch
  budget for every model;
* ``converged`` (synthetic, ``--protocol converged``): every model trained until its
  validation F1 has not improved for ``patience`` epochs, within one maximum budget;
* ``--data PATH``: a real A/B/label folder, trained on random crops of its training
  scenes, validated and tested on whole scenes (tiled), every model trained until
  it stops improving. The split: the named split whose scenes the folder holds
  (``SPLITS``: ``sztaki``, the literature's, and ``levir-samples``), else
  ``PATH/list/{train,val,test}.txt``, else a seeded split by scene written to
  ``--out`` as such lists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hicd_core import backend  # noqa: E402
from hicd_core.data import (  # noqa: E402
    SETTINGS,
    FolderDataset,
    InMemory,
    Repeat,
    Subset,
    load_splits,
    split_scenes,
    write_split_lists,
)
from hicd_core.errors import DatasetError, HicdError  # noqa: E402
from hicd_core.experiment import (  # noqa: E402
    PROFILES,
    STUDENTS,
    Profile,
    decision_threshold,
    run_summary,
    test_views,
    train_student,
    train_teacher,
    validation_view,
    write_json,
)
from hicd_core.infer import evaluate  # noqa: E402
from hicd_core.io import atomic_path  # noqa: E402
from hicd_core.metrics import METRIC_KEYS  # noqa: E402
from hicd_core.networks import DEFAULT_MODEL, MODELS  # noqa: E402

VARIANTS = ("baseline", "feature-mse", "hicd-self", "hicd-self-cross", "hicd")
LABELS = {name: STUDENTS[name][0] for name in VARIANTS}
LABELS["hicd"] = "student HiCD full"
METHODS = ("teacher HQ/HQ", "teacher HQ/LQ") + tuple(LABELS[v] for v in VARIANTS)

# The 6-epoch sweep (see docs/studies/reproduce_notes.md for how it was chosen on validation):
# 64x64 scenes, 320 training pairs, the same budget and learning rate for every model.
PROFILES["sweep"] = Profile(size=64, n_train=320, n_val=64, n_test=128, teacher_epochs=6, student_epochs=6,
                            lr=2e-3, student_lr=2e-3)
# The converged protocol on the same scenes: every model stops once validation F1 has not
# improved for `patience` epochs; the maximum budgets are large enough that runs stop by
# patience rather than by budget (docs/studies/converged_notes.md says how this was checked).
PROFILES["converged"] = Profile(size=64, n_train=320, n_val=64, n_test=128, teacher_epochs=60, student_epochs=40,
                                lr=2e-3, student_lr=2e-3, patience=8)
# Real LEVIR-CD sample tiles: 256x256, random 64x64 training crops, 16 crops per tile per epoch
# (the configuration of docs/studies/levir.md, fixed-epoch).
PROFILES["levir"] = Profile(size=256, crop=64, batch_size=8, teacher_epochs=10, student_epochs=6,
                            lr=2e-3, student_lr=2e-3, repeats=16)
# Real scenes with the recipe for imbalanced change (chosen on the SZTAKI validation scenes,
# docs/studies/sztaki_notes.md): normalised inputs, change pixels weighted in the BCE plus
# soft Dice, half of the crops drawn around change, early stopping, whole-scene tiled validation.
PROFILES["real"] = Profile(size=128, crop=128, batch_size=8, teacher_epochs=40, student_epochs=40,
                           lr=2e-3, student_lr=2e-3, patience=10, dice_weight=1.0, pos_weight=5.0, normalize=True,
                           change_crop_rate=0.5, eval_tile=256, repeats=16)

# The same recipe with the best model chosen by the mean validation F1 of 3 epochs: on the
# SZTAKI study's two validation scenes F1 jumps 10-25 points from epoch to epoch, so the best
# single epoch is often a spike (docs/studies/sztaki_notes.md). Decided before any run with it;
# its rows go to a study of their own (--tag sztaki-smoothed) and are reported either way.
PROFILES["real-smoothed"] = replace(PROFILES["real"], smoothing=3)

# A smoke run of the real-data path (tests, a first try on a new folder): minutes, not a result.
PROFILES["real-quick"] = replace(PROFILES["real"], size=32, crop=16, batch_size=4, teacher_epochs=2,
                                 student_epochs=2, patience=1, eval_tile=32, repeats=4)

# FC-Siam-diff (--model fc-siam-diff) gets a profile of its own where one was chosen for it on
# validation; "<profile>-<model>" replaces the study's default profile (choose_study).
# On real scenes: the `real` recipe with what the SZTAKI validation probes chose for this network
# (docs/studies/sztaki-fc-siam-diff_notes.md, rows in results/recipe_probe.json): no dropout,
# weight decay 0.1 and colour jitter 0.2 against the over-fitting of nine training scenes, and the
# weights averaged (ema 0.99) so that the selected epoch is less of a lottery.
PROFILES["real-fc-siam-diff"] = replace(PROFILES["real"], model="fc-siam-diff", dropout=0.0, weight_decay=0.1,
                                        colour_jitter=0.2, ema=0.99)
# The same recipe with every map scored after a 17 x 17 window mean of the change probability
# (filter_radius 8): validation epochs, model selection and the test rows alike. Chosen on the
# validation scenes from the checkpoints of the study above before any run with it
# (examples/probes/smooth_probe.py, results/smooth_probe.md, docs/studies/sztaki-fc-siam-diff-filtered_notes.md);
# its rows go to a study of their own (--tag sztaki-fc-siam-diff-filtered) and are reported either way.
# Early stopping waits for 20 epochs (min_epochs): FC-Siam-diff's validation F1 takes off late
# (epoch 6-15 in both SZTAKI studies) and a filtered map scores 8-21 at epoch 1 and ~0 for the
# next epochs, so patience 10 counted from that first epoch stopped 3 of the first 27 runs at
# epoch 11 before they learnt anything (docs/studies/sztaki-fc-siam-diff-filtered_notes.md).
# Set from those validation curves; every run that ran 20 epochs or more is unchanged by it.
PROFILES["real-fc-siam-diff-filtered"] = replace(PROFILES["real-fc-siam-diff"], filter_radius=8, min_epochs=20)
# The filtered recipe with its model selection mended (issue 27, item 3; validation scenes only,
# docs/studies/sztaki-fc-siam-diff-precise_notes.md): the weight average warmed up (ema_warmup), so
# that it no longer carries the initial weights through the first ~10 epochs (validation F1 ~0 at
# epochs 2-6 and below 30 until epoch 10-12 in every seed of the filtered study), and each
# validation run with BatchNorm statistics re-estimated for the averaged weights over 18 fixed
# training batches (precise_bn), not with the running ones of the trained weights, which the last
# batches dominate: the same weights scored
# 0.3-10.7 points lower with other batches' statistics than with the saved ones that selection had
# picked (examples/probes/bn_probe.py), and the validation curve's epoch-to-epoch jumps after epoch
# 10 fell from 3.8 and 5.1 to 1.3 and 1.1 points (seeds 0, 1; site_probe.py --curves). Its rows
# go to a study of their own (--tag sztaki-fc-siam-diff-precise).
# No early stopping (min_epochs = the 40-epoch budget): on these smooth curves patience 10 ended the
# teachers of seeds 2 and 3 at epochs 21 and 20, and the same runs carried on to 40 passed their
# epoch-10/11 best by 2.1 and 5.8 points on validation in the second half of the cosine schedule
# (same notes; the four teacher rows measured before are in results/sztaki-fc-siam-diff-precise_superseded.json).
PROFILES["real-fc-siam-diff-precise"] = replace(PROFILES["real-fc-siam-diff-filtered"], ema_warmup=True,
                                                precise_bn=18, min_epochs=40)
# The precise recipe, each model scored at its own decision threshold: the one of 0.30, 0.35, .., 0.90 with the
# highest F1 on the pairs its run validated on, not 0.5. Trained and selected exactly as the precise study (its
# checkpoints are reused: --runs-of sztaki-fc-siam-diff-precise). Chosen on the validation scenes before any test
# row (examples/probes/threshold_probe.py, docs/studies/sztaki-fc-siam-diff-calibrated_notes.md): at 0.5 every
# precise baseline student marks more change than is labelled (validation precision 34-46, recall 77-82); its best
# threshold, 0.55-0.70, lifts validation F1 by 1.8-10.8 points, most where it was lowest (mean ± std over seeds
# 51.64 ± 2.92 -> 59.18 ± 1.72 at resolution-x4, 52.23 ± 4.67 -> 58.28 ± 0.45 at multi). Its rows go to a study
# of their own (--tag sztaki-fc-siam-diff-calibrated).
PROFILES["real-fc-siam-diff-calibrated"] = replace(PROFILES["real-fc-siam-diff-precise"],
                                                   threshold_grid=tuple(round(0.3 + 0.05 * i, 2) for i in range(13)))
# On the synthetic scenes: the converged protocol without dropout (chosen on the synthetic validation
# pairs, results/network_probe.json; the published 0.2 learns far slower at this budget).
PROFILES["converged-fc-siam-diff"] = replace(PROFILES["converged"], model="fc-siam-diff", dropout=0.0)

SPLITS = {
    # the split of the literature (Daudt et al., ICIP 2018); the validation scenes were chosen
    # once, before any test number was seen, one per site, and are not to be changed
    "sztaki": {"test": ["szada_1", "tiszadob_3"], "val": ["szada_2", "tiszadob_2"], "label_threshold": 128},
    "levir-samples": {"test": ["test_2_0000_0000", "test_55_0256_0000", "test_77_0512_0256"],
                      "val": ["val_27_0000_0256"]},
}


def machine_description(backend_name):
    """'x86_64, 2 CPUs (AMD EPYC), backend numpy' or the like."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}, {os.cpu_count()} CPUs ({model or 'unknown model'}), backend {backend_name}"


# --------------------------------------------------------------------------- splits of a real folder


def named_split(names):
    """The name of the split in ``SPLITS`` whose test and validation scenes are all in ``names``, or None."""
    for key, split in SPLITS.items():
        if set(split["test"]) | set(split["val"]) <= set(names):
            return key
    return None


def folder_splits(root, prof, *, label_threshold=None, out=None, seed=0):
    """``(train, val, test, description)`` of a real folder: training scenes repeated for random crops."""
    root = Path(root)
    key = None
    if (root / "list").is_dir() and all((root / "list" / f"{p}.txt").is_file() for p in ("train", "val", "test")):
        parts = {p: FolderDataset(root, p, label_threshold=label_threshold).names for p in ("train", "val", "test")}
        how = f"the lists in {root / 'list'}"
    else:
        names = FolderDataset(root, label_threshold=label_threshold).names
        key = named_split(names)
        if key is not None:
            split = SPLITS[key]
            parts = {"test": list(split["test"]), "val": list(split["val"])}
            parts["train"] = [n for n in names if n not in parts["test"] and n not in parts["val"]]
            how = f"the named split {key!r}"
            if label_threshold is None:
                label_threshold = split.get("label_threshold")
        else:
            if out is None:
                raise DatasetError(f"{root}: neither a named split ({', '.join(SPLITS)}) nor list/train.txt, "
                                   "list/val.txt and list/test.txt; a seeded split needs a folder to write its "
                                   "lists to")
            parts = split_scenes(names, seed=seed)
            write_split_lists(parts, out, overwrite=True)
            how = f"a seeded split (seed {seed}) written to {Path(out) / 'list'}"
    full = FolderDataset(root, label_threshold=label_threshold)
    index = {n: i for i, n in enumerate(full.names)}
    overlap = (set(parts["train"]) & set(parts["test"])) | (set(parts["train"]) & set(parts["val"])) | \
        (set(parts["val"]) & set(parts["test"]))
    if overlap:
        raise HicdError(f"{root}: scenes in more than one split: {sorted(overlap)[:5]}")
    cached = InMemory(full)  # a few large scenes: decode each once
    subsets = {p: Subset(cached, [index[n] for n in parts[p]]) for p in ("train", "val", "test")}
    description = (f"{how}: test {parts['test']}, validation {parts['val']}, {len(parts['train'])} training scenes"
                   + (f", labels >= {label_threshold} are change" if label_threshold is not None else ""))
    return Repeat(subsets["train"], prof.repeats), subsets["val"], subsets["test"], description, key


# --------------------------------------------------------------------------- rows and the report


def load_rows(path):
    return json.loads(path.read_text()) if path.exists() else []


def row(setting, method, seed, init, metrics, summary=None, per_scene=None):
    r = {"setting": setting, "method": method, "seed": seed, "init": init, **{k: metrics[k] for k in METRIC_KEYS}}
    if summary is not None:
        r.update(best_epoch=summary["best_epoch"], epochs_run=summary["epochs_run"], val_f1=summary["val_f1"])
    if per_scene is not None:
        r["f1_per_scene"] = per_scene
    return r


def row_key(r):
    return r["setting"], r["method"], r["seed"], r.get("init", "fresh")


def label(method, init):
    """A table label: students that started from the teacher are marked."""
    return f"{method} (from teacher)" if init == "teacher" and not method.startswith("teacher") else method


def summarise(rows, field="f1"):
    """{(setting, label): (mean, std, n)} of ``field`` over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"], label(r["method"], r.get("init", "fresh"))), []).append(r[field])
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    return {key: (statistics.mean(v), sd(v), len(v)) for key, v in groups.items()}


def row_labels(rows):
    inits = sorted({r.get("init", "fresh") for r in rows}) or ["fresh"]
    labels = list(METHODS)
    if "teacher" in inits:
        labels += [label(m, "teacher") for m in METHODS[2:]]
    present = {label(r["method"], r.get("init", "fresh")) for r in rows}
    return [lab for lab in labels if lab in present]


def results_table(rows, settings):
    f1, iou = summarise(rows, "f1"), summarise(rows, "iou")
    head = "| method | " + " | ".join(f"{s} F1 | {s} IoU" for s in settings) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(settings)]
    for lab in row_labels(rows):
        cells = []
        for s in settings:
            if (s, lab) in f1:
                m, sd, n = f1[(s, lab)]
                mark = "" if n == 3 else f" (n={n})"
                cells += [f"{m:.2f} ± {sd:.2f}{mark}", "{:.2f} ± {:.2f}".format(*iou[(s, lab)][:2])]
            else:
                cells += ["–", "–"]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows, settings, cell):
    """``cell(row)`` (a string, or None where the row has none) per model and setting, one entry per seed in seed
    order; the teacher's HQ/LQ row is left out (the same model as HQ/HQ)."""
    cells = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if cell(r) is not None:
            cells.setdefault((r["setting"], label(r["method"], r.get("init", "fresh"))), []).append(cell(r))
    if not cells:
        return ""
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for lab in row_labels(rows):
        if lab == "teacher HQ/LQ":
            continue
        lines.append(f"| {lab} | " + " | ".join(", ".join(cells.get((s, lab), ["–"])) for s in settings) + " |")
    return "\n".join(lines)


def per_scene_table(rows, settings):
    """F1 per test scene, mean ± std over seeds, for real folders."""
    scenes = sorted({name for r in rows for name in r.get("f1_per_scene", {})})
    if not scenes:
        return ""
    cols = [(s, name) for s in settings for name in scenes]
    lines = ["| method | " + " | ".join(f"{s} {name}" for s, name in cols) + " |", "|---|" + "---:|" * len(cols)]
    for lab in row_labels(rows):
        cells = []
        for s, name in cols:
            v = [r["f1_per_scene"][name] for r in rows if r["setting"] == s and "f1_per_scene" in r
                 and label(r["method"], r.get("init", "fresh")) == lab and name in r["f1_per_scene"]]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}" if v else "–")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def t_interval(values, level=0.95):
    """``(low, high)``: the two-sided ``level`` interval of the mean of ``values`` by Student's t
    (``mean ± t_{(1+level)/2, n-1} sd / sqrt(n)``); None for fewer than two values."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / n ** 0.5
    return statistics.mean(values) - half, statistics.mean(values) + half


def paired(rows, setting, a, b, init="fresh"):
    """Mean and sample std of (a - b) F1 over the seeds where both were measured, and those seeds."""
    f1 = {(r["method"], r["seed"]): r["f1"] for r in rows
          if r["setting"] == setting and r.get("init", "fresh") == init}
    seeds = sorted({s for (m, s) in f1 if m == a} & {s for (m, s) in f1 if m == b})
    if not seeds:
        return None, None, []
    d = [f1[(a, s)] - f1[(b, s)] for s in seeds]
    return statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0, seeds


def interval_text(rows, setting, a, b, init="fresh"):
    """'95 % interval [lo, hi], above zero' (or 'below zero', 'includes zero'); '' for fewer than two seeds."""
    f1 = {(r["method"], r["seed"]): r["f1"] for r in rows
          if r["setting"] == setting and r.get("init", "fresh") == init}
    seeds = sorted({s for (m, s) in f1 if m == a} & {s for (m, s) in f1 if m == b})
    ci = t_interval([f1[(a, s)] - f1[(b, s)] for s in seeds])
    if ci is None:
        return ""
    where = "above zero" if ci[0] > 0 else "below zero" if ci[1] < 0 else "includes zero"
    return f"95 % interval [{ci[0]:+.2f}, {ci[1]:+.2f}] (t over {len(seeds)} seeds), {where}"


def verdict(rows, settings):
    """HiCD full against the baseline and feature matching, paired by seed, per student init."""
    lines = []
    for init in sorted({r.get("init", "fresh") for r in rows}):
        wins, measured, versus_fmse = 0, 0, []
        for s in settings:
            d, sd, seeds = paired(rows, s, "teacher HQ/HQ", "student baseline", init)
            if d is not None:  # what the teacher knows on clean pairs beyond what the baseline learns on degraded ones
                ci = interval_text(rows, s, "teacher HQ/HQ", "student baseline", init)
                lines.append(f"- {s}, students {init}: teacher HQ/HQ − baseline = {d:+.2f} F1, the room to distil "
                             f"(paired by seed, std {sd:.2f}, seeds {seeds}" + (f"; {ci}" if ci else "") + ")")
            d, sd, seeds = paired(rows, s, "student HiCD full", "student baseline", init)
            if d is not None:
                measured += 1
                wins += d >= 1.0
                ci = interval_text(rows, s, "student HiCD full", "student baseline", init)
                lines.append(f"- {s}, students {init}: HiCD full − baseline = {d:+.2f} F1 "
                             f"(paired by seed, std {sd:.2f}, seeds {seeds}" + (f"; {ci}" if ci else "") + ")")
            d, _, _ = paired(rows, s, "student HiCD full", "student feature-mse", init)
            if d is not None:
                versus_fmse.append(d)
        if measured:
            lines.append(f"- students {init}: HiCD full ≥ baseline + 1.0 F1 in {wins} of {measured} measured settings")
        if versus_fmse:
            lines.append(f"- students {init}: HiCD full − feature-mse, mean over measured settings "
                         f"{statistics.mean(versus_fmse):+.2f} F1")
    return "\n".join(lines) or "- nothing measured yet"


COLOURS = [(90, 90, 90), (170, 170, 170), (66, 133, 244), (251, 188, 5), (52, 168, 83), (0, 150, 136),
           (219, 68, 55), (120, 60, 160), (240, 120, 40), (30, 90, 160), (160, 160, 40), (200, 90, 150)]


def _canvas(W, H):
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None, None
    img = Image.new("RGB", (W, H), "white")
    return img, ImageDraw.Draw(img)


def _save(img, path):
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def bar_plot(rows, settings, path):
    """Grouped bars (F1 per method, one group per setting) with ±1 std error bars, drawn with Pillow."""
    W, H, left, bottom, top = 1100, 530, 60, 96, 36
    img, d = _canvas(W, H)
    if img is None:
        return None
    stats, labels = summarise(rows), row_labels(rows)
    plot_h = H - bottom - top
    y_of = lambda v: top + plot_h * (1 - v / 100.0)  # noqa: E731
    for v in range(0, 101, 20):
        d.line([(left, y_of(v)), (W - 10, y_of(v))], fill=(225, 225, 225))
        d.text((left - 30, y_of(v) - 6), f"{v}", fill="black")
    group_w = (W - left - 20) / len(settings)
    bar_w = group_w * 0.8 / max(len(labels), 1)
    for g, s in enumerate(settings):
        x0 = left + g * group_w + group_w * 0.1
        for k, lab in enumerate(labels):
            if (s, lab) not in stats:
                continue
            f1, sd = stats[(s, lab)][:2]
            xa, xb = x0 + k * bar_w, x0 + (k + 1) * bar_w - 2
            d.rectangle([xa, y_of(f1), xb, y_of(0)], fill=COLOURS[k % len(COLOURS)])
            xc = (xa + xb) / 2
            d.line([(xc, y_of(min(f1 + sd, 100))), (xc, y_of(max(f1 - sd, 0)))], fill="black", width=1)
        d.text((x0 + group_w * 0.25, H - bottom + 8), s, fill="black")
    d.text((left, H - bottom + 24), "quality setting of t2 (held-out test set; teacher HQ/HQ: the clean test set)",
           fill="black")
    for k, lab in enumerate(labels):
        x, y = left + (k % 4) * 260, H - bottom + 42 + (k // 4) * 14
        d.rectangle([x, y + 2, x + 10, y + 10], fill=COLOURS[k % len(COLOURS)])
        d.text((x + 14, y), lab, fill="black")
    d.text((left, 6), "F1 of the change class (%), mean over seeds, error bars ±1 standard deviation", fill="black")
    d.text((5, top - 16), "F1 (%)", fill="black")
    return _save(img, path)


def curve_plot(rows, settings, path, methods=("student baseline", "student HiCD full")):
    """Validation F1 against epoch, mean over seeds (of the runs still going at that epoch), one panel a setting."""
    curves = {}
    for r in rows:
        if r["method"] in methods and r.get("val_f1"):
            curves.setdefault((r["setting"], label(r["method"], r.get("init", "fresh"))), []).append(r["val_f1"])
    if not curves:
        return None
    labels = sorted({lab for (_, lab) in curves})
    panels = [s for s in settings if any(k[0] == s for k in curves)]
    pw, ph, left, top, bottom = 330, 280, 40, 36, 60
    img, d = _canvas(pw * len(panels) + 20, ph + bottom)
    if img is None:
        return None
    longest = max(len(c) for cs in curves.values() for c in cs)
    for p, s in enumerate(panels):
        x0 = p * pw + left
        x_of = lambda e: x0 + (pw - left - 10) * (e - 1) / max(longest - 1, 1)  # noqa: E731, B023
        y_of = lambda v: top + (ph - top - 20) * (1 - v / 100.0)  # noqa: E731
        for v in range(0, 101, 20):
            d.line([(x0, y_of(v)), (x0 + pw - left - 10, y_of(v))], fill=(225, 225, 225))
            d.text((x0 - 25, y_of(v) - 6), f"{v}", fill="black")
        step = max(1, (longest + 4) // 5)
        for e in range(1, longest + 1, step):  # epoch ticks along the x axis
            d.line([(x_of(e), y_of(0)), (x_of(e), y_of(0) + 3)], fill="black")
            d.text((x_of(e) - 4, y_of(0) + 4), f"{e}", fill="black")
        d.text((x0 + 5, ph - 4), f"{s}: epoch", fill="black")
        d.text((x0 - 25, 6), "validation F1 (%), mean over seeds", fill="black")
        for k, lab in enumerate(labels):
            cs = curves.get((s, lab), [])
            points = []
            for e in range(longest):
                vals = [c[e] for c in cs if len(c) > e]
                if vals:
                    points.append((x_of(e + 1), y_of(statistics.mean(vals))))
            if len(points) > 1:
                d.line(points, fill=COLOURS[(k + 2) % len(COLOURS)], width=2)
    for k, lab in enumerate(labels):
        x, y = left + (k % 2) * 300, ph + 14 + (k // 2) * 14
        d.rectangle([x, y + 2, x + 10, y + 10], fill=COLOURS[(k + 2) % len(COLOURS)])
        d.text((x + 14, y), lab, fill="black")
    return _save(img, path)


def _relative(path, start):
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()


def commands(meta):
    """The invocations that measured a study's rows (``commands``; older meta files kept one ``command``)."""
    return list(meta.get("commands") or ([meta["command"]] if meta.get("command") else []))


def commands_text(meta):
    """The report's line(s) naming the commands that measured the rows."""
    found = commands(meta)
    if len(found) <= 1:
        return f"- command: `{found[0] if found else ''}`"
    return "- commands (each measured some of the rows):\n" + "\n".join(f"  - `{c}`" for c in found)


def write_report(rows, meta, settings, report, plot, *, title, results, notes):
    # every setting with rows, whichever worker writes (two may fill one study, a setting each)
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)] or list(settings)
    notes_text = Path(notes).read_text() if Path(notes).exists() else ""
    seconds = sum(meta.get("seconds", {}).values())
    rel = lambda p: _relative(p, report.parent)  # noqa: E731
    curves = plot.with_name(plot.stem.replace("_f1", "") + "_curves.png")
    has_curves = curve_plot(rows, settings, curves) is not None
    epochs = per_seed_table(rows, settings,
                            lambda r: f"{r['best_epoch']}/{r['epochs_run']}" if "best_epoch" in r else None)
    thresholds = per_seed_table(rows, settings, lambda r: f"{r['threshold']:.2f}" if "threshold" in r else None)
    scenes = per_scene_table(rows, settings)
    plots = f"[`{plot.name}`]({rel(plot)})" + (f" and [`{curves.name}`]({rel(curves)})" if has_curves else "")
    text = f"""# {title}

Generated by `examples/reproduce.py` from [`{Path(results).name}`]({rel(results)});
the plots are {plots}. Do not edit by hand: the hand-written part below comes
from `{_relative(notes, ROOT)}`.

{commands_text(meta)}
- last updated: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
- machine: {"; ".join(dict.fromkeys(r["host"] for r in rows if "host" in r)) or meta.get("machine", "")}
- wall time of the measured rows (training + evaluation, summed): {seconds / 60:.1f} min
- configuration: {meta.get("profile", "")}

Mean ± standard deviation over seeds of F1 and IoU (percent) of the change class on each
setting's held-out low-quality test set (`teacher HQ/HQ`: the clean test set):

{results_table(rows, settings)}

HiCD full against the baseline student and plain feature matching, on what has been
measured so far:

{verdict(rows, settings)}

![F1 per method and setting]({rel(plot)})
"""
    if scenes:
        text += f"\nF1 per test scene (mean ± std over seeds):\n\n{scenes}\n"
    if epochs:
        text += ("\nBest validation epoch / epochs trained, one entry per seed in seed order (a run that stopped "
                 f"before its budget stopped by patience):\n\n{epochs}\n")
    if thresholds:
        text += ("\nDecision threshold of each model, chosen on the pairs its run validated on (the highest F1 of the "
                 f"profile's grid), one entry per seed in seed order:\n\n{thresholds}\n")
    if has_curves:
        text += f"\n![validation F1 by epoch, baseline and HiCD full, mean over seeds]({rel(curves)})\n"
    text += f"\n{notes_text}"
    with atomic_path(report) as tmp:
        tmp.write_text(text)
    bar_plot(rows, settings, plot)


# --------------------------------------------------------------------------- the run


def evaluate_scenes(model, dataset, prof, *, tta=False, threshold=0.5):
    """Pooled metrics over a test set (one confusion matrix) and F1 per scene, by name, at ``threshold`` (``tta``:
    as in ``infer.evaluate``; the studies evaluate without it)."""
    from hicd_core.metrics import ConfusionMatrix

    pooled, per_scene = ConfusionMatrix(), {}
    names = getattr(dataset, "names", [str(i) for i in range(len(dataset))])
    for i, name in enumerate(names):
        m = evaluate(model, Subset(dataset, [i]), batch_size=1, tile=prof.eval_tile, tta=tta, threshold=threshold,
                     filter_radius=prof.filter_radius)
        per_scene[name] = m["f1"]
        pooled.tp, pooled.fp, pooled.fn, pooled.tn = (pooled.tp + m["tp"], pooled.fp + m["fp"],
                                                      pooled.fn + m["fn"], pooled.tn + m["tn"])
    return pooled.compute(), per_scene


def study_paths(args, tag):
    results = Path(args.results or ROOT / "results" / f"{tag}.json")
    report = Path(args.report or ROOT / "docs" / "studies" / f"{tag}.md")
    notes = ROOT / "docs" / "studies" / f"{tag}_notes.md"
    return results, results.with_name(results.stem + "_meta.json"), report, report.parent / "images" / f"{tag}_f1.png", notes


TITLES = {"reproduce": "Reproducing the HiCD claim: the 6-epoch sweep on synthetic scenes",
          "converged": "HiCD against converged students on synthetic scenes",
          "sztaki": "HiCD on the SZTAKI AirChange scenes",
          "sztaki-smoothed": "HiCD on the SZTAKI AirChange scenes, best model by a 3-epoch mean of validation F1",
          "levir": "HiCD on the LEVIR-CD sample tiles",
          "sztaki-fc-siam-diff": "HiCD on the SZTAKI AirChange scenes with FC-Siam-diff",
          "converged-fc-siam-diff": "HiCD against converged students on synthetic scenes with FC-Siam-diff",
          "sztaki-fc-siam-diff-filtered": "HiCD on the SZTAKI AirChange scenes with FC-Siam-diff, maps scored after a "
                                          "17 x 17 window mean",
          "sztaki-fc-siam-diff-precise": "HiCD on the SZTAKI AirChange scenes with FC-Siam-diff, window mean, "
                                         "models selected with precise BatchNorm statistics",
          "sztaki-fc-siam-diff-calibrated": "HiCD on the SZTAKI AirChange scenes with FC-Siam-diff, precise "
                                            "selection, each model's decision threshold chosen on validation"}


#: The studies of the README's summary, in its order: (tag, what it is).
SUMMARY = (("reproduce", "synthetic, 6-epoch sweep"), ("converged", "synthetic, converged"),
           ("sztaki", "SZTAKI AirChange"), ("sztaki-smoothed", "SZTAKI, 3-epoch selection"),
           ("levir", "LEVIR-CD samples"), ("converged-fc-siam-diff", "synthetic, converged, FC-Siam-diff"),
           ("sztaki-fc-siam-diff", "SZTAKI AirChange, FC-Siam-diff"),
           ("sztaki-fc-siam-diff-filtered", "SZTAKI AirChange, FC-Siam-diff, window mean 17 x 17"),
           ("sztaki-fc-siam-diff-precise", "SZTAKI AirChange, FC-Siam-diff, precise selection"),
           ("sztaki-fc-siam-diff-calibrated", "SZTAKI AirChange, FC-Siam-diff, threshold chosen on validation"))


def summary_table(settings=SETTINGS, root=ROOT):
    """The README's table: per study (rows) and setting (columns), HiCD full − baseline (fresh students, paired by
    seed) with its 95 % t interval; the studies with a pair of students, each linked to its report."""
    lines = ["| study (seeds) | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
    for tag, what in SUMMARY:
        path = root / "results" / f"{tag}.json"
        if not path.exists():
            continue
        rows = load_rows(path)
        cells, seeds = [], set()
        for s in settings:
            d, _, used = paired(rows, s, "student HiCD full", "student baseline")
            if d is None:
                cells.append("–")
                continue
            seeds |= set(used)
            f1 = {(r["method"], r["seed"]): r["f1"] for r in rows if r["setting"] == s and r.get("init", "fresh") == "fresh"}
            ci = t_interval([f1[("student HiCD full", x)] - f1[("student baseline", x)] for x in used])
            cells.append(f"{d:+.2f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""))
        if not seeds:  # only teachers so far (a study's first stage): no paired student yet
            continue
        lines.append(f"| [{what}](docs/studies/{tag}.md) ({min(seeds)}-{max(seeds)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--teacher-only", action="store_true",
                        help="train the teachers and record their rows, no students (a study's first stage)")
    parser.add_argument("--student-init", nargs="+", default=["fresh"], choices=["fresh", "teacher"],
                        help="how students start (both: every variant is trained both ways)")
    parser.add_argument("--protocol", default="sweep", choices=["sweep", "converged"],
                        help="synthetic data: the 6-epoch sweep or train-until-it-stops (default sweep)")
    parser.add_argument("--data", default=None, help="a real A/B/label folder instead of the synthetic scenes")
    parser.add_argument("--label-threshold", type=int, default=None,
                        help="binarise masks with grey pixels: value >= T is change (named splits set their own)")
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="sizes, schedules and recipe (default: from the study)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"the network of every model of the study (default {DEFAULT_MODEL}); another one "
                             "gets a study of its own, <study>-<model>")
    parser.add_argument("--tag", default=None, help="name of the study's rows and report (default: from the data "
                                                    "and the model)")
    parser.add_argument("--out", default="runs/reproduce", help="checkpoints (reused when present)")
    parser.add_argument("--runs-of", default=None, metavar="STUDY",
                        help="train into (and reuse) the checkpoints of STUDY under --out: for a study that trains "
                             "exactly as STUDY does and scores differently (a run of another configuration is refused)")
    parser.add_argument("--results", default=None, help="rows JSON (default results/<study>.json)")
    parser.add_argument("--report", default=None, help="report path (default docs/studies/<study>.md)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--summary", action="store_true",
                        help="print the README's table (HiCD full - baseline per study and setting) and stop")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: no such folder")
    if args.label_threshold is not None and not 1 <= args.label_threshold <= 255:
        parser.error(f"--label-threshold must be in 1..255, got {args.label_threshold}")
    return args


def choose_study(args):
    """``(tag, profile name, split key or None)`` for the arguments.

    Without ``--profile`` the study's default profile is used, or its ``<profile>-<model>``
    variant where the network has one (``real-fc-siam-diff``, ``converged-fc-siam-diff``).
    """
    suffix = "" if args.model == DEFAULT_MODEL else f"-{args.model}"

    def own(name):
        return args.profile or (f"{name}-{args.model}" if f"{name}-{args.model}" in PROFILES else name)

    if args.data is None:
        tag = args.tag or ("converged" if args.protocol == "converged" else "reproduce") + suffix
        return tag, own("converged" if args.protocol == "converged" else "sweep"), None
    names = FolderDataset(args.data, label_threshold=args.label_threshold).names
    key = named_split(names)
    tag = args.tag or ({"sztaki": "sztaki", "levir-samples": "levir"}.get(key) or
                       "".join(c if c.isalnum() else "-" for c in Path(args.data).resolve().name.lower())) + suffix
    # the LEVIR sample tiles keep the fixed-epoch profile their published rows were measured with
    return tag, own("levir" if key == "levir-samples" else "real"), key


def main(argv=None):
    args = parse_args(argv)
    if args.summary:
        print(summary_table())
        return []
    backend.keep_host_memory()  # reuse freed host memory across steps (see its docstring)
    tag, profile, _ = choose_study(args)
    results, meta_path, report, plot, notes = study_paths(args, tag)
    rows = load_rows(results)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"seconds": {}}
    report_args = dict(title=TITLES.get(tag, f"HiCD on {tag}"), results=results, notes=notes)
    if args.report_only:  # the stored meta describes the run that measured the rows
        write_report(rows, meta, args.settings, report, plot, **report_args)
        return rows
    prof = replace(PROFILES[profile], model=args.model)
    xp = backend.namespace(args.backend)
    done = {row_key(r) for r in rows}
    command = "python examples/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta.update(machine=machine_description(args.backend))

    def record(r, seconds):
        r = {**r, "host": meta["machine"]}  # a model retrained on another CPU is another model (rounding)
        # several sweeps may add rows to one study at once: merge with what is on disk, under a lock
        with _study_lock(results):
            rows[:] = [x for x in load_rows(results) if row_key(x) != row_key(r)] + [r]
            on_disk = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            meta["seconds"] = {**on_disk.get("seconds", {}), **meta["seconds"],
                               "|".join(str(k) for k in row_key(r)): round(seconds, 1)}
            # every invocation that measured rows, in the order they first did
            meta["commands"] = list(dict.fromkeys(commands(on_disk) + commands(meta) + [command]))
            meta.pop("command", None)
            write_json(results, rows)
            write_json(meta_path, meta)
            write_report(rows, meta, args.settings, report, plot, **report_args)
        print(f"{r['setting']:14s} seed {r['seed']}  {label(r['method'], r['init']):40s} F1 {r['f1']:6.2f}  "
              f"IoU {r['iou']:6.2f}" + (f"  best epoch {r['best_epoch']}/{r['epochs_run']}" if "best_epoch" in r else ""),
              flush=True)

    runs = Path(args.out) / (args.runs_of or tag)
    cuts = {}  # (run folder, validation pairs) -> decision threshold: a teacher's is chosen once for its rows

    def threshold_of(model, folder, role, setting, val):
        key = (folder, setting if role == "student" else "clean")
        if key not in cuts:
            cuts[key] = decision_threshold(model, prof, validation_view(val, role, setting),
                                           batch_size=None if args.data is None else 1)[0]
        return cuts[key]

    for seed in args.seeds:
        out = runs / f"seed{seed}"
        if args.data is None:
            splits = load_splits(None, size=prof.size, n_train=prof.n_train, n_val=prof.n_val,
                                 n_test=prof.n_test, seed=seed)
            meta["profile"] = f"{profile}: {prof}; students start: {' and '.join(args.student_init)}"
        else:
            train, val, test, described, _ = folder_splits(args.data, prof, label_threshold=args.label_threshold,
                                                           out=runs, seed=0)
            splits = (train, val, test)
            meta["profile"] = f"{profile}: {prof}; split: {described}; students start: {' and '.join(args.student_init)}"
        teacher = []  # trained (or loaded) the first time a row needs it

        def the_teacher():
            if not teacher:
                started = time.perf_counter()
                teacher.append(train_teacher(out / "teacher", splits, prof, seed=seed, xp=xp,
                                             progress=not args.no_progress))
                meta["seconds"][f"teacher|{seed}"] = round(time.perf_counter() - started, 1)
            return teacher[0]

        for setting in args.settings:
            # a fresh baseline student learns without the teacher: it comes first, the teacher only when needed
            students = [(v, init) for init in args.student_init for v in args.variants
                        if (setting, LABELS[v], seed, init) not in done and not args.teacher_only]
            free = [w for w in students if w == ("baseline", "fresh")]
            wanted = free + [(m, "fresh") for m in METHODS[:2] if (setting, m, seed, "fresh") not in done]
            wanted += [w for w in students if w not in free]
            test_hq, test_lq = test_views(splits[2], setting, seed)
            for variant, init in wanted:
                t = time.perf_counter()
                if variant in METHODS[:2]:
                    data = test_hq if variant == "teacher HQ/HQ" else test_lq
                    cut = threshold_of(the_teacher(), out / "teacher", "teacher", setting, splits[1])
                    record(_measure(the_teacher(), data, prof, args, setting, variant, seed, "fresh",
                                    _summary(out / "teacher"), cut), time.perf_counter() - t)
                    continue
                distilled = variant != "baseline" or init == "teacher"
                folder = out / setting / (f"student-{variant}" + ("-from-teacher" if init == "teacher" else ""))
                student = train_student(folder, variant, splits, prof, the_teacher() if distilled else None,
                                        setting=setting, seed=seed, xp=xp, progress=not args.no_progress,
                                        student_init=init)
                r = _measure(student, test_lq, prof, args, setting, LABELS[variant], seed, init, _summary(folder),
                             threshold_of(student, folder, "student", setting, splits[1]))
                if distilled:  # which teacher it learnt from
                    r["teacher_best_val_f1"] = max(_summary(out / "teacher")["val_f1"])
                record(r, time.perf_counter() - t)
    return rows


@contextlib.contextmanager
def _study_lock(results):
    """An exclusive lock (``fcntl.flock``) on ``<results>.lock`` while a row is merged in and written."""
    import fcntl

    lock_path = Path(results).with_name(Path(results).name + ".lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _summary(folder):
    summary = run_summary(folder)
    log = Path(folder) / "log.jsonl"
    summary["val_f1"] = [json.loads(line)["val"]["f1"] for line in log.read_text().splitlines() if line.strip()]
    return summary


def _measure(model, data, prof, args, setting, method, seed, init, summary, threshold):
    """The test row of ``model`` on ``data`` at ``threshold`` (``decision_threshold``'s: 0.5 unless the profile
    has a threshold grid, recorded in the row when it has)."""
    if args.data is None:
        r = row(setting, method, seed, init, evaluate(model, data, batch_size=prof.batch_size, threshold=threshold,
                                                      filter_radius=prof.filter_radius), summary)
    else:
        pooled, per_scene = evaluate_scenes(model, data, prof, threshold=threshold)
        r = row(setting, method, seed, init, pooled, summary, per_scene)
    if prof.threshold_grid:
        r["threshold"] = threshold
    return r


if __name__ == "__main__":
    try:
        main()
    except HicdError as exc:
        print(f"reproduce.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
