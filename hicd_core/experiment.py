"""The comparison HiCD is about: teacher, baseline student and distilled students on one setting.

``run_comparison`` trains (or reuses) a teacher on HQ/HQ pairs, then each
requested student on HQ/LQ pairs, picks every model's checkpoint by validation
F1, and evaluates all of them on one held-out low-quality test set (t2 of test
sample ``i`` degraded with seed ``[test_seed, i]``). Rows:

``teacher HQ/HQ``   the teacher on the clean test pairs (upper bound);
``teacher HQ/LQ``   the teacher on the degraded pairs (no adaptation);
``student <name>``  each student on the degraded pairs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import backend
from .data.folder import DegradedView
from .data.splits import load_splits
from .infer import choose_threshold, evaluate
from .io import atomic_path, load_checkpoint
from .metrics import METRIC_KEYS
from .networks import DEFAULT_MODEL
from .train import METHODS, DistillConfig, TrainConfig, default_windows, fit, load_model

__all__ = [
    "Profile",
    "PROFILES",
    "STUDENTS",
    "ROW_NAMES",
    "student_config",
    "train_teacher",
    "train_student",
    "validation_view",
    "decision_threshold",
    "test_views",
    "run_summary",
    "run_comparison",
    "format_table",
]


@dataclass(frozen=True)
class Profile:
    """Sizes, schedules and the training recipe of a comparison run.

    ``teacher_epochs`` / ``student_epochs`` are maximum budgets when ``patience``
    is set (training stops once validation F1 has not improved for ``patience``
    epochs); ``min_epochs``, ``smoothing``, ``dice_weight``, ``pos_weight``, ``normalize``, ``change_crop_rate`` and
    ``eval_tile`` are the ``TrainConfig`` fields of the same names (``filter_radius`` too, which the test
    rows' evaluation applies as well), and so are ``model`` (the network,
    ``networks.MODELS``), ``dropout``, ``bottleneck``, ``ema``, ``ema_warmup``, ``precise_bn``,
    ``weight_decay`` (the optimizer's, teacher and students alike) and ``colour_jitter``; ``repeats``: how many random crops of each training scene
    make one epoch (real data). ``threshold_grid`` changes the scoring only: when given, each model's test rows
    use the threshold of the grid with the highest F1 on the pairs its run validated on (``decision_threshold``),
    not 0.5; training and model selection are those of the same profile without it.
    """

    size: int = 64
    n_train: int = 400
    n_val: int = 64
    n_test: int = 128
    crop: int | None = None
    batch_size: int = 8
    teacher_epochs: int = 8
    student_epochs: int = 6
    lr: float = 2e-3
    student_lr: float = 1e-3
    patience: int | None = None
    min_epochs: int = 0
    smoothing: int = 1
    dice_weight: float = 0.0
    pos_weight: float | None = None
    normalize: bool = False
    change_crop_rate: float = 0.0
    eval_tile: int | None = None
    repeats: int = 1
    model: str = DEFAULT_MODEL
    dropout: float | None = None
    bottleneck: str | None = None
    ema: float | None = None
    ema_warmup: bool = False
    precise_bn: int = 0
    weight_decay: float = 1e-2
    colour_jitter: float = 0.0
    filter_radius: int = 0
    threshold_grid: tuple = ()


PROFILES = {
    "default": Profile(),
    "quick": Profile(size=32, n_train=48, n_val=16, n_test=16, teacher_epochs=3, student_epochs=2),
}

# name -> (row label, DistillConfig fields)
STUDENTS = {
    "baseline": ("student baseline", dict(method="baseline")),
    "feature-mse": ("student feature-mse", dict(method="feature-mse")),
    "hicd-self": ("student HiCD self", dict(method="hicd", w_cross=0.0, w_global=0.0, use_change=False)),
    "hicd-self-cross": ("student HiCD self+cross", dict(method="hicd", w_global=0.0, use_change=False)),
    "hicd": ("student HiCD", dict(method="hicd")),
}
ROW_NAMES = ("teacher HQ/HQ", "teacher HQ/LQ") + tuple(label for label, _ in STUDENTS.values())
for _name, (_, _fields) in STUDENTS.items():  # every variant names a registered method (train.METHODS)
    if _fields["method"] not in METHODS:
        raise ValueError(f"student variant {_name!r}: unknown method {_fields['method']!r}; registered: {METHODS}")


def student_config(name, size, **overrides) -> DistillConfig:
    """The distillation settings of a named student variant at input ``size`` (default taps and windows)."""
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; choose from {sorted(STUDENTS)}")
    windows, change_window = default_windows(size)
    fields = dict(windows=windows, change_window=change_window)
    fields.update(STUDENTS[name][1])
    fields.update(overrides)
    return DistillConfig(**fields)


def _metrics_row(method, metrics):
    return {"method": method, **{k: metrics[k] for k in METRIC_KEYS}}


def _base_config(prof, seed):
    return TrainConfig(role="teacher", epochs=prof.teacher_epochs, batch_size=prof.batch_size, crop=prof.crop,
                       lr=prof.lr, seed=seed, patience=prof.patience, min_epochs=prof.min_epochs,
                       smoothing=prof.smoothing,
                       dice_weight=prof.dice_weight, pos_weight=prof.pos_weight, normalize=prof.normalize,
                       change_crop_rate=prof.change_crop_rate, eval_tile=prof.eval_tile, model=prof.model,
                       dropout=prof.dropout, bottleneck=prof.bottleneck, ema=prof.ema, ema_warmup=prof.ema_warmup,
                       precise_bn=prof.precise_bn, weight_decay=prof.weight_decay,
                       colour_jitter=prof.colour_jitter, filter_radius=prof.filter_radius)


def train_teacher(out_dir, splits, prof, *, seed=0, xp=None, progress=True, log=print):
    """Train (or resume, or reuse when finished) the teacher in ``out_dir``; returns the best-F1 model."""
    train_set, val_set = splits[0], splits[1]
    base = _base_config(prof, seed)
    log(f"[seed {seed}] teacher: {len(train_set)} training pairs, {base.epochs} epochs")
    fit(base, train_set, val_set, out_dir, xp=xp, resume=True, progress=progress)
    return load_model(Path(out_dir) / "best.h5", xp=xp)[0]


def train_student(out_dir, name, splits, prof, teacher, *, setting, seed=0, xp=None, progress=True,
                  student_init="teacher", init_seed=None, distill_overrides=None, log=print):
    """Train (or resume / reuse) the named student variant in ``out_dir``; returns the best-F1 model.
    ``init_seed``: a fresh student's initial weights from this seed, its data from ``seed`` (None: ``seed``)."""
    train_set, val_set = splits[0], splits[1]
    distill = student_config(name, prof.crop or prof.size, **(distill_overrides or {}))
    cfg = replace(_base_config(prof, seed), role="student", setting=setting, epochs=prof.student_epochs,
                  lr=prof.student_lr, distill=distill, student_init=student_init, init_seed=init_seed)
    log(f"[{setting} seed {seed}] {STUDENTS[name][0]}: {cfg.epochs} epochs")
    fit(cfg, train_set, val_set, out_dir, xp=xp, teacher=teacher, resume=True, progress=progress)
    return load_model(Path(out_dir) / "best.h5", xp=xp)[0]


def run_summary(out_dir):
    """``{"best_epoch", "epochs_run", "stopped"}`` of a finished run in ``out_dir`` (from ``last.h5``)."""
    extra = load_checkpoint(Path(out_dir) / "last.h5")["extra"]
    return {"best_epoch": int(extra["best"]["epoch"]), "epochs_run": int(extra["epoch"]),
            "stopped": bool(extra.get("stopped", False))}


def validation_view(val_set, role, setting):
    """The pairs a run of ``role`` validated on: the clean ones for a teacher, for a student t2 degraded by
    ``setting`` (``TrainConfig.val_seed``, as ``fit`` degrades them)."""
    return DegradedView(val_set, setting, TrainConfig.val_seed) if role == "student" else val_set


def decision_threshold(model, prof, val_view, *, batch_size=None):
    """``(threshold, {threshold: validation metrics} or None)`` for scoring ``model``: 0.5, or with
    ``prof.threshold_grid`` the grid's threshold of highest F1 on ``val_view`` (``infer.choose_threshold``),
    each map scored as the run validated it (``eval_tile``, ``filter_radius``)."""
    if not prof.threshold_grid:
        return 0.5, None
    return choose_threshold(model, val_view, prof.threshold_grid, batch_size=batch_size or prof.batch_size,
                            tile=prof.eval_tile, filter_radius=prof.filter_radius)


def test_views(test_set, setting, seed, test_seed=None):
    """The held-out HQ test set and its LQ version (t2 of sample i degraded with seed [test_seed, i])."""
    return test_set, DegradedView(test_set, setting, 54321 + seed if test_seed is None else test_seed)


def run_comparison(out_dir, *, setting, seed=0, data=None, students=("baseline", "hicd"), profile="default",
                   backend_name="numpy", progress=True, distill_overrides=None, student_init="teacher",
                   test_seed=None, log=print):
    """Train and evaluate the comparison; returns ``{"rows": [...], "setting", "seed", "seconds"}``.

    Checkpoints go to ``out_dir/teacher`` and ``out_dir/student-<name>``; an
    interrupted run resumes epoch by epoch when called again on the same folder.
    """
    started = time.perf_counter()
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    xp = backend.namespace(backend_name)
    out_dir = Path(out_dir)
    splits = load_splits(data, size=prof.size, n_train=prof.n_train, n_val=prof.n_val, n_test=prof.n_test, seed=seed)
    teacher = train_teacher(out_dir / "teacher", splits, prof, seed=seed, xp=xp, progress=progress, log=log)
    test_hq, test_lq = test_views(splits[2], setting, seed, test_seed)

    def score(model, data, role):
        threshold, _ = decision_threshold(model, prof, validation_view(splits[1], role, setting))
        return evaluate(model, data, batch_size=prof.batch_size, threshold=threshold, filter_radius=prof.filter_radius)

    rows = [_metrics_row("teacher HQ/HQ", score(teacher, test_hq, "teacher")),
            _metrics_row("teacher HQ/LQ", score(teacher, test_lq, "teacher"))]
    models = {"teacher": teacher}
    for name in students:
        student = train_student(out_dir / f"student-{name}", name, splits, prof, teacher, setting=setting,
                                seed=seed, xp=xp, progress=progress, student_init=student_init,
                                distill_overrides=(distill_overrides or {}).get(name), log=log)
        models[name] = student
        rows.append(_metrics_row(STUDENTS[name][0], score(student, test_lq, "student")))
    return {"setting": setting, "seed": seed, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "models": models, "test_lq": test_lq, "test_hq": test_hq}


def format_table(rows, keys=("f1", "iou", "precision", "recall", "oa", "kappa")):
    """A plain-text / Markdown table: method | F1 | IoU | precision | recall | OA | kappa."""
    titles = {"f1": "F1", "iou": "IoU", "precision": "precision", "recall": "recall", "oa": "OA", "kappa": "kappa"}
    width = max(len(r["method"]) for r in rows)
    head = "| " + "method".ljust(width) + " | " + " | ".join(titles[k].rjust(9) for k in keys) + " |"
    rule = "|" + "-" * (width + 2) + "|" + "|".join("-" * 10 + ":" for _ in keys) + "|"
    lines = [head, rule]
    for r in rows:
        lines.append("| " + r["method"].ljust(width) + " | " + " | ".join(f"{r[k]:9.2f}" for k in keys) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
