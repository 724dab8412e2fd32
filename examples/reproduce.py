"""Reproduce the paper's claim: every quality setting x seed x student variant, on held-out LQ test sets.

    python examples/reproduce.py                              # the full sweep (resumable)
    python examples/reproduce.py --settings multi --seeds 0   # a part of it
    python examples/reproduce.py --report-only                # rebuild docs/RESULTS.md and the plot
    python examples/reproduce.py --levir ../shared/data/levir-cd-samples --seeds 0 1 2

For each seed one teacher is trained on HQ/HQ pairs (it does not depend on the
quality setting); then, for each setting, the rows ``teacher HQ/HQ``,
``teacher HQ/LQ`` and one row per student variant are evaluated on the same
held-out LQ test set. Rows go to ``results/reproduce.json`` (a list of
``{setting, method, seed, f1, iou, precision, recall, oa, kappa}``) as soon as
each is measured; rows already there are skipped, so an interrupted sweep
resumes where it stopped (a finished model's checkpoint is reused when its
folder still exists). ``docs/RESULTS.md`` and ``docs/images/reproduce_f1.png``
are rebuilt after every row; the hand-written part of the report lives in
``docs/results_notes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hicd_core import backend  # noqa: E402
from hicd_core.data import SETTINGS, FolderDataset, Repeat, Subset, load_splits  # noqa: E402
from hicd_core.experiment import (  # noqa: E402
    PROFILES,
    STUDENTS,
    Profile,
    test_views,
    train_student,
    train_teacher,
    write_json,
)
from hicd_core.infer import evaluate  # noqa: E402
from hicd_core.io import atomic_path  # noqa: E402
from hicd_core.metrics import METRIC_KEYS  # noqa: E402

VARIANTS = ("baseline", "feature-mse", "hicd-self", "hicd-self-cross", "hicd")
LABELS = {name: STUDENTS[name][0] for name in VARIANTS}
LABELS["hicd"] = "student HiCD full"
METHODS = ("teacher HQ/HQ", "teacher HQ/LQ") + tuple(LABELS[v] for v in VARIANTS)

# The sweep's configuration (see docs/results_notes.md for how it was chosen on validation):
# 64x64 scenes, 320 training pairs, the same 6-epoch budget and learning rate for the teacher
# and for every student, students from a fresh initialisation.
PROFILES["sweep"] = Profile(size=64, n_train=320, n_val=64, n_test=128, teacher_epochs=6, student_epochs=6,
                            lr=2e-3, student_lr=2e-3)
# Real LEVIR-CD tiles: 256x256, random 64x64 training crops, 16 crops per tile per epoch; the
# sweep's learning rates (not tuned on these tiles), more teacher epochs for the smaller epochs.
PROFILES["levir"] = Profile(size=256, crop=64, batch_size=8, teacher_epochs=10, student_epochs=6,
                            lr=2e-3, student_lr=2e-3)
LEVIR_SPLIT = {
    "test": ["test_2_0000_0000", "test_55_0256_0000", "test_77_0512_0256"],
    "val": ["val_27_0000_0256"],
}  # training: the other 7 tiles
LEVIR_CROPS_PER_TILE = 16  # random crops of each training tile per epoch


def levir_splits(root, crops_per_tile=LEVIR_CROPS_PER_TILE):
    full = FolderDataset(root)
    index = {name: i for i, name in enumerate(full.names)}
    test = [index[n] for n in LEVIR_SPLIT["test"]]
    val = [index[n] for n in LEVIR_SPLIT["val"]]
    train = [i for n, i in index.items() if i not in test and i not in val]
    return Repeat(Subset(full, train), crops_per_tile), Subset(full, val), Subset(full, test)


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


def load_rows(path):
    return json.loads(path.read_text()) if path.exists() else []


def row(setting, method, seed, metrics):
    return {"setting": setting, "method": method, "seed": seed, **{k: metrics[k] for k in METRIC_KEYS}}


def summarise(rows):
    """{(setting, method): (mean f1, std f1, mean iou, std iou, n)} over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        f1 = [r["f1"] for r in rs]
        iou = [r["iou"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        out[key] = (statistics.mean(f1), sd(f1), statistics.mean(iou), sd(iou), len(rs))
    return out


def results_table(rows, settings):
    stats = summarise(rows)
    head = "| method | " + " | ".join(f"{s} F1 | {s} IoU" for s in settings) + " |"
    rule = "|---|" + "---:|---:|" * len(settings)
    lines = [head, rule]
    for m in METHODS:
        cells = []
        for s in settings:
            if (s, m) in stats:
                f1, f1s, iou, ious, n = stats[(s, m)]
                mark = "" if n == 3 else f" (n={n})"
                cells += [f"{f1:.2f} ± {f1s:.2f}{mark}", f"{iou:.2f} ± {ious:.2f}"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows, setting, a, b):
    """Mean of (a - b) F1 over the seeds where both methods were measured, and those seeds."""
    f1 = {(r["method"], r["seed"]): r["f1"] for r in rows if r["setting"] == setting}
    seeds = sorted({s for (m, s) in f1 if m == a} & {s for (m, s) in f1 if m == b})
    if not seeds:
        return None, []
    return statistics.mean(f1[(a, s)] - f1[(b, s)] for s in seeds), seeds


def verdict(rows, settings):
    """The issue's target, checked on whatever has been measured (differences paired by seed)."""
    lines, wins, measured, versus_fmse = [], 0, 0, []
    for s in settings:
        d, seeds = paired(rows, s, "student HiCD full", "student baseline")
        if d is not None:
            measured += 1
            wins += d >= 1.0
            lines.append(f"- {s}: HiCD full − baseline = {d:+.2f} F1 (mean over seeds {seeds})")
        d, seeds = paired(rows, s, "student HiCD full", "student feature-mse")
        if d is not None:
            versus_fmse.append(d)
    if measured:
        lines.append(f"- settings where HiCD full beats the baseline by ≥ 1.0 F1: {wins} of {measured} measured "
                     "(target: at least 3 of 4)")
    if versus_fmse:
        lines.append(f"- HiCD full − feature-mse, mean over measured settings: {statistics.mean(versus_fmse):+.2f} F1 "
                     "(target: > 0)")
    return "\n".join(lines) or "- nothing measured yet"


def bar_plot(rows, settings, path):
    """Grouped bars (F1 per method, one group per setting) with ±1 std error bars, drawn with Pillow."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    stats = summarise(rows)
    colours = [(90, 90, 90), (170, 170, 170), (66, 133, 244), (251, 188, 5), (52, 168, 83), (0, 150, 136),
               (219, 68, 55)]
    W, H, left, bottom, top = 1100, 480, 60, 60, 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    plot_h = H - bottom - top
    y_of = lambda v: top + plot_h * (1 - v / 100.0)  # noqa: E731
    for v in range(0, 101, 20):
        d.line([(left, y_of(v)), (W - 10, y_of(v))], fill=(225, 225, 225))
        d.text((left - 30, y_of(v) - 6), f"{v}", fill="black")
    group_w = (W - left - 20) / len(settings)
    bar_w = group_w * 0.8 / len(METHODS)
    for g, s in enumerate(settings):
        x0 = left + g * group_w + group_w * 0.1
        for k, m in enumerate(METHODS):
            if (s, m) not in stats:
                continue
            f1, sd = stats[(s, m)][:2]
            xa, xb = x0 + k * bar_w, x0 + (k + 1) * bar_w - 2
            d.rectangle([xa, y_of(f1), xb, y_of(0)], fill=colours[k])
            xc = (xa + xb) / 2
            d.line([(xc, y_of(min(f1 + sd, 100))), (xc, y_of(max(f1 - sd, 0)))], fill="black", width=1)
        d.text((x0 + group_w * 0.25, H - bottom + 8), s, fill="black")
    for k, m in enumerate(METHODS):
        x = left + (k % 4) * 250
        y = H - bottom + 26 + (k // 4) * 14
        d.rectangle([x, y + 2, x + 10, y + 10], fill=colours[k])
        d.text((x + 14, y), m, fill="black")
    d.text((5, top), "F1", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def _relative(path, start):
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()


def write_report(rows, meta, settings, report, plot, title="Reproducing the HiCD claim", results=None, notes=None):
    results = Path(results or ROOT / "results" / "reproduce.json")
    notes = Path(notes or ROOT / "docs" / "results_notes.md")
    notes_text = notes.read_text() if notes.exists() else ""
    seconds = sum(meta.get("seconds", {}).values())
    rel = lambda p: _relative(p, report.parent)  # noqa: E731
    text = f"""# {title}

Generated by `examples/reproduce.py` from [`{results.name}`]({rel(results)});
the plot is [`{plot.name}`]({rel(plot)}). Do not edit by hand: the
hand-written part below comes from `{_relative(notes, ROOT)}`.

- command: `{meta.get("command", "")}`
- last updated: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
- machine: {meta.get("machine", "")}
- wall time of the measured rows (training + evaluation, summed): {seconds / 60:.1f} min
- configuration: {meta.get("profile", "")}

Mean ± standard deviation over seeds of F1 and IoU (percent) of the change class on each
setting's held-out low-quality test set (`teacher HQ/HQ`: the clean test set):

{results_table(rows, settings)}

The target (issue 6), on what has been measured so far:

{verdict(rows, settings)}

![F1 per method and setting]({rel(plot)})

{notes_text}"""
    with atomic_path(report) as tmp:
        tmp.write_text(text)
    bar_plot(rows, settings, plot)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="sizes and schedules (default: sweep, or levir with --levir)")
    parser.add_argument("--student-init", default="fresh", choices=["teacher", "fresh"])
    parser.add_argument("--levir", default=None, help="run the LEVIR-CD sample tiles instead (separate report)")
    parser.add_argument("--out", default="runs/reproduce", help="checkpoints (reused when present)")
    parser.add_argument("--results", default=None, help="rows JSON (default results/reproduce.json)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--report", default=None, help="report path (default docs/RESULTS.md)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    backend.keep_host_memory()  # reuse freed host memory across steps (see its docstring)

    tag = "levir" if args.levir else "reproduce"
    results = Path(args.results or ROOT / "results" / f"{tag}.json")
    meta_path = results.with_name(results.stem + "_meta.json")
    report = Path(args.report or ROOT / "docs" / ("RESULTS_LEVIR.md" if args.levir else "RESULTS.md"))
    plot = report.parent / "images" / f"{tag}_f1.png"
    rows = load_rows(results)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"seconds": {}}
    profile = args.profile or ("levir" if args.levir else "sweep")
    title = "HiCD on the LEVIR-CD sample tiles" if args.levir else "Reproducing the HiCD claim"
    notes = ROOT / "docs" / ("results_levir_notes.md" if args.levir else "results_notes.md")
    report_args = dict(title=title, results=results, notes=notes)
    if args.report_only:  # the stored meta describes the sweep that measured the rows
        write_report(rows, meta, args.settings, report, plot, **report_args)
        return rows
    prof = PROFILES[profile]
    if args.levir:
        described = (f"{profile}: tiles {LEVIR_SPLIT} for test and validation, the other 7 for training "
                     f"(random {prof.crop}x{prof.crop} crops, {LEVIR_CROPS_PER_TILE} per tile and epoch), batch {prof.batch_size}, "
                     f"teacher {prof.teacher_epochs} epochs at lr {prof.lr}, students {prof.student_epochs} "
                     f"epochs at lr {prof.student_lr}")
    else:
        described = f"{profile}: {prof}"
    meta.update(command="python examples/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                machine=machine_description(args.backend),
                profile=f"{described}; student init: {args.student_init}")
    xp = backend.namespace(args.backend)
    done = {(r["setting"], r["method"], r["seed"]) for r in rows}

    def record(setting, method, seed, metrics, seconds):
        rows.append(row(setting, method, seed, metrics))
        meta["seconds"][f"{setting}|{method}|{seed}"] = round(seconds, 1)
        write_json(results, rows)
        write_json(meta_path, meta)
        write_report(rows, meta, args.settings, report, plot, **report_args)
        print(f"{setting:14s} seed {seed}  {method:26s} F1 {metrics['f1']:6.2f}  IoU {metrics['iou']:6.2f}", flush=True)

    for seed in args.seeds:
        if args.levir:
            splits = levir_splits(args.levir)
        else:
            splits = load_splits(None, size=prof.size, n_train=prof.n_train, n_val=prof.n_val,
                                 n_test=prof.n_test, seed=seed)
        out = Path(args.out) / tag / f"seed{seed}"
        teacher = None
        for setting in args.settings:
            wanted = [m for m in METHODS if (setting, m, seed) not in done and
                      (m.startswith("teacher") or any(LABELS[v] == m for v in args.variants))]
            if not wanted:
                continue
            started = time.perf_counter()
            if teacher is None:
                teacher = train_teacher(out / "teacher", splits, prof, seed=seed, xp=xp,
                                        progress=not args.no_progress)
                meta["seconds"][f"teacher|{seed}"] = round(time.perf_counter() - started, 1)
            test_hq, test_lq = test_views(splits[2], setting, seed)
            for method, data in (("teacher HQ/HQ", test_hq), ("teacher HQ/LQ", test_lq)):
                if method in wanted:
                    t = time.perf_counter()
                    record(setting, method, seed, evaluate(teacher, data, batch_size=prof.batch_size),
                           time.perf_counter() - t)
            for variant in args.variants:
                if LABELS[variant] not in wanted:
                    continue
                t = time.perf_counter()
                student = train_student(out / setting / f"student-{variant}", variant, splits, prof, teacher,
                                        setting=setting, seed=seed, xp=xp, progress=not args.no_progress,
                                        student_init=args.student_init)
                record(setting, LABELS[variant], seed, evaluate(student, test_lq, batch_size=prof.batch_size),
                       time.perf_counter() - t)
    return rows


if __name__ == "__main__":
    main()
