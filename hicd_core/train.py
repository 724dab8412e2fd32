"""Training steps for the teacher and the students.

``train_step`` is one optimisation step of a network (``networks.MODELS``) on a batch: task loss
(BCE with logits, optionally plus soft Dice), and for a student an optional
distillation loss against a frozen teacher's taps on the high-quality version
of the same pair:

* ``baseline``: task loss only;
* ``hicd``: ``hicd_loss`` (SPEC section 2) on the semantic taps (default E2, E3,
  E4) and the change features ``d1``;
* ``feature-mse``: plain feature matching (FitNets) on the same taps.

The loop (epochs, validation, checkpoints, resume) is built on top of this.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from . import backend
from .backend import all_finite
from .data.degradations import SETTINGS
from .data.folder import DegradedView, change_fraction, channel_stats, validate_dataset
from .data.loader import TrainBatches
from .distill import feature_mse_loss, hicd_loss
from .errors import CheckpointError, NonFiniteError
from .fc_siam import BOTTLENECKS
from .functional import bce_with_logits, soft_dice
from .infer import evaluate
from .io import atomic_path, load_checkpoint, remove_stale_temps, run_lock, save_checkpoint
from .metrics import METRIC_KEYS
from .networks import DEFAULT_MODEL, MODELS, build_model, load_model, model_name
from .optim import SGD, AdamW, make_schedule
from .parallel import average_gradients, shard
from .progress import Progress

__all__ = ["DistillConfig", "TrainConfig", "FitResult", "train_step", "fit", "load_model", "default_windows", "METHODS",
           "DISTILL_METHODS", "distillation_loss"]


def default_windows(size: int):
    """Windows of the default taps (E2, E3, E4) and of d1 for a square input of side ``size``.

    SPEC section 4 fixes (8, 8, None) and 8 at input 64; elsewhere a stage keeps
    window 8 when 8 divides its side and falls back to the whole map (None) when
    the map is at most 8x8 or 8 does not divide it; E4 keeps the whole map up to
    input 64 (an 8x8 map) and uses 8 above.
    """
    def pick(side, whole_up_to=8):
        return None if side <= whole_up_to or side % 8 else 8

    return (pick(size // 2), pick(size // 4), pick(size // 8)), pick(size, whole_up_to=0)


@dataclass
class DistillConfig:
    """How a student is distilled from the teacher.

    ``weight`` multiplies the whole distillation loss; ``taps`` and ``windows``
    are the semantic stages and their correlation windows; ``change_window`` is
    the window of the change features ``d1`` (None: the whole map), and
    ``use_change`` switches the change-feature terms on. ``weight_schedule``:
    ``"constant"`` (SPEC 2, the default) or ``"cosine"``, the weight decayed from
    ``weight`` at the first step to 0 at the end of the run's budget (``fit``'s
    ``epochs``), an option beside the SPEC loss (docs/MATH.md, section 9).
    """

    method: str = "hicd"
    weight: float = 1.0
    taps: tuple = ("E2", "E3", "E4")
    windows: tuple = (8, 8, None)
    use_change: bool = True
    change_window: int | None = 8
    w_self: float = 1.0
    w_cross: float = 1.0
    w_global: float = 1.0
    kind: str = "kl"
    tau: float = 0.5
    weight_schedule: str = "constant"

    def __post_init__(self):
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"distillation weight_schedule must be one of {WEIGHT_SCHEDULES}, "
                             f"got {self.weight_schedule!r}")
        if self.method != "baseline" and self.method not in DISTILL_METHODS:
            raise ValueError(f"unknown student method {self.method!r}; choose one of {('baseline', *DISTILL_METHODS)}")
        for name in ("weight", "w_self", "w_cross", "w_global"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"distillation {name} must be a finite number >= 0, got {value!r}")
        self.taps, self.windows = tuple(self.taps), tuple(self.windows)
        if len(self.taps) != len(self.windows):
            raise ValueError(f"{len(self.taps)} taps but {len(self.windows)} windows")

    def at_step(self, step: int, total: int) -> "DistillConfig":
        """These settings at training step ``step`` of ``total`` (the weight of ``weight_schedule``)."""
        if self.weight_schedule == "constant":
            return self
        progress = min(max(step, 0), total) / max(total, 1)
        return replace(self, weight=self.weight * 0.5 * (1.0 + math.cos(math.pi * progress)),
                       weight_schedule="constant")


WEIGHT_SCHEDULES = ("constant", "cosine")


def _hicd_method(cfg: DistillConfig, taps, teacher_taps, comm=None):
    """HiCD (SPEC 2) on the semantic taps and, with ``use_change``, on ``d1``."""
    loss, grads = hicd_loss(
        [taps[t] for t in cfg.taps], [teacher_taps[t] for t in cfg.taps],
        taps["d1"] if cfg.use_change else None, teacher_taps["d1"] if cfg.use_change else None,
        windows=cfg.windows, change_window=cfg.change_window, w_self=cfg.w_self, w_cross=cfg.w_cross,
        w_global=cfg.w_global, kind=cfg.kind, tau=cfg.tau, check_finite=False, comm=comm,
    )
    tap_grads = {t: (g1 * cfg.weight, g2 * cfg.weight) for t, (g1, g2) in zip(cfg.taps, grads["sem"])}
    if grads["chg"] is not None:
        tap_grads["d1"] = grads["chg"] * cfg.weight
    return loss * cfg.weight, grads["terms"], tap_grads


def _feature_mse_method(cfg: DistillConfig, taps, teacher_taps, comm=None):  # noqa: ARG001
    """Plain feature matching (FitNets) on both phases of each semantic tap, plus ``d1`` (per image: no
    communication; the mean over ranks of the shards' means is the global batch's mean)."""
    names = [(t, i) for t in cfg.taps for i in (0, 1)]
    student = [taps[t][i] for t, i in names]
    teacher = [teacher_taps[t][i] for t, i in names]
    if cfg.use_change:
        student.append(taps["d1"])
        teacher.append(teacher_taps["d1"])
    loss, grads = feature_mse_loss(student, teacher, check_finite=False)
    tap_grads = {}
    for (t, i), g in zip(names, grads):
        pair = list(tap_grads.get(t, (None, None)))
        pair[i] = g * cfg.weight
        tap_grads[t] = tuple(pair)
    if cfg.use_change:
        tap_grads["d1"] = grads[-1] * cfg.weight
    return loss * cfg.weight, {"feature_mse": loss}, tap_grads


# The registry of distillation losses: DistillConfig, the CLI (through experiment.STUDENTS) and the
# experiments check method names against it; a new loss is one function and one entry here.
DISTILL_METHODS = {"hicd": _hicd_method, "feature-mse": _feature_mse_method}
METHODS = ("baseline", *DISTILL_METHODS)


def distillation_loss(cfg: DistillConfig, taps, teacher_taps, comm=None):
    """The distillation loss of ``cfg.method`` between a student's and a teacher's taps.

    ``comm``: the data-parallel communicator (``hicd_core.parallel``), for losses with
    batch-wide terms. Returns ``(loss, terms, tap_grads)``: the 0-d loss and its named terms, both already
    scaled by ``cfg.weight``'s part (``loss`` includes it), and the gradients for the
    student's taps in the form ``TinySiamCD.backward`` takes.
    """
    if cfg.method not in DISTILL_METHODS:
        raise ValueError(f"method {cfg.method!r} has no distillation loss; choose one of {tuple(DISTILL_METHODS)}")
    # a method takes comm= only when it has batch-wide terms (and a run has several ranks)
    return DISTILL_METHODS[cfg.method](cfg, taps, teacher_taps, **({} if comm is None else {"comm": comm}))


def train_step(model, optimizer, x1, x2, label, *, lr=None, teacher=None, teacher_x2=None,
               distill: DistillConfig | None = None, dice_weight=0.0, ignore_index=None, pos_weight=None,
               check_finite=True, comm=None, rng=None):
    """One optimisation step; returns a dict of 0-d loss arrays (no host sync besides the finiteness check).

    Parameters
    ----------
    model : TinySiamCD or FCSiamDiff (updated in place: parameters, BatchNorm buffers)
    optimizer : AdamW or SGD over ``model.params``
    x1, x2 : arrays (N, 3, H, W)
        The pair the model sees (for a student, ``x2`` is the low-quality image).
    label : array (N, H, W) of {0, 1} (or ``ignore_index``)
    lr : float, optional
        Learning rate of this step (schedules); the optimizer's own if None.
    teacher : TinySiamCD or FCSiamDiff, optional
        Frozen teacher, run in evaluation mode on ``(x1, teacher_x2)``.
    teacher_x2 : array, optional
        High-quality t2 for the teacher (default ``x2``).
    distill : DistillConfig, optional
        Required with a teacher unless its method is ``baseline``.
    dice_weight : float
        Weight of the soft Dice term added to BCE (0: off).
    pos_weight : float, optional
        Weight of the change pixels in the BCE (``bce_with_logits``); None: 1.
    check_finite : bool
        Raise ``NonFiniteError`` naming the term or the parameter if the loss or
        any gradient is NaN/inf (one device sync per step).
    comm : communicator, optional
        Data-parallel training (``hicd_core.parallel``): the arrays are this rank's
        shard of the global batch; BatchNorm is synchronised, HiCD's global terms
        gather the global batch, and the gradients are averaged over ranks (one
        all-reduce) before the update, so every rank takes the same step. The BCE
        (without ignored pixels) and the distillation losses then equal the
        single-process ones on the global batch; soft Dice and BCE with ignored pixels
        are computed per shard and averaged.
    rng : numpy.random.Generator, optional
        Source of the dropout masks of networks with dropout (``FCSiamDiff``); ``fit`` passes one
        seeded by the run's seed and the step, so that runs repeat and resume bit for bit.

    Returns
    -------
    dict name -> 0-d array: ``loss`` (total), ``bce``, optionally ``dice``, ``distill``
    and the distillation terms.
    """
    logits, taps, cache = model.forward(x1, x2, training=True, sync=comm, rng=rng)
    loss, dlogits = bce_with_logits(logits, label, ignore_index=ignore_index, pos_weight=pos_weight)
    terms = {"bce": loss}
    if dice_weight:
        d, dd = soft_dice(logits, label, ignore_index=ignore_index)
        terms["dice"] = d * dice_weight
        loss = loss + terms["dice"]
        dlogits = dlogits + dd * dice_weight
    tap_grads = None
    if distill is not None and distill.method != "baseline":
        if teacher is None:
            raise ValueError(f"student method {distill.method!r} needs a teacher")
        _, teacher_taps, _ = teacher.forward(x1, x2 if teacher_x2 is None else teacher_x2, training=False, keep_cache=False)
        d_loss, d_terms, tap_grads = distillation_loss(distill, taps, teacher_taps, comm)
        terms["distill"] = d_loss
        terms.update({f"distill/{k}": v for k, v in d_terms.items()})
        loss = loss + d_loss
    terms["loss"] = loss
    grads = model.backward(dlogits, cache, tap_grads)
    if comm is not None:
        grads = average_gradients(grads, comm)
    if check_finite and not all_finite(loss, *grads.values()):
        bad = [k for k, v in terms.items() if not all_finite(v)]
        if bad:
            raise NonFiniteError(f"non-finite loss term(s): {', '.join(bad)}")
        bad = [k for k, v in grads.items() if not all_finite(v)]
        raise NonFiniteError(f"non-finite gradient for parameter(s): {', '.join(bad)}")
    optimizer.step(model.params, grads, lr=lr)
    return terms


# --------------------------------------------------------------------------- the training loop


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint and checked on resume).

    ``role``: ``"teacher"`` (HQ/HQ pairs, task loss) or ``"student"`` (t2 degraded
    by ``setting``, drawn fresh per batch, plus ``distill``). ``student_init``:
    ``"teacher"`` starts a student from the teacher's weights (the default: every
    student variant starts from the same point, and the comparison isolates the
    loss), ``"fresh"`` from the Kaiming initialisation of ``init_seed`` (None, the default: ``seed``).
    Everything else a run draws (its batches, crops, augmentations and degradations, dropout
    masks, the batches of ``precise_bn``) follows ``seed``, so two runs can share their initial
    weights and differ in their data, or the other way round; a student that starts from the
    teacher has no initial weights of its own and takes no ``init_seed``.
    Validation uses a fixed low-quality set: t2 of sample ``i`` degraded with
    seed ``[val_seed, i]``.

    The recipe for real, imbalanced scenes (all off by default, the SPEC forms):
    ``pos_weight`` weights the change pixels in the BCE (``"auto"``: the ratio of no-change to
    change pixels over the training labels, ``data.change_fraction``, the inverse-frequency class
    weighting of Daudt et al. 2018; the log records the value); ``normalize`` standardises
    the input channels with statistics of the training set (``True``) or each image by
    its own (``"image"``: t1 and t2 separately, a crop's or a tile's own statistics; a
    student that starts from the teacher takes the teacher's), stored with the model in
    every checkpoint; ``change_crop_rate`` is the share of training crops drawn around a
    change pixel; ``colour_jitter`` (0: off) gives t1 and t2 of every training crop a random gain
    in ``1 ± colour_jitter`` and offset in ``± colour_jitter / 2`` per channel, each image its own
    (``data.random_colour``); ``pair_degrade_rate`` (0: off) is the share of a teacher's training crops
    whose t1 and t2 are both degraded by the quality setting ``pair_degrade``, each image with its own
    seed (an augmentation: validation and test pairs stay clean); ``patience`` stops training once
    validation F1 has not improved for that many epochs (``epochs`` is then the maximum budget; the
    learning-rate schedule spans the whole budget), but never before ``min_epochs`` epochs have run (0, the
    default: from the first epoch on), so that a network whose validation F1 takes off late is not
    stopped by the count from a lucky first epoch; ``smoothing`` selects the best model (and counts
    the patience) by the mean validation F1 of the last ``smoothing`` epochs instead of
    each epoch's own (1, the default), for validation sets so small that F1 jumps from
    epoch to epoch: ``best.h5`` is then the model at the end of the best run of
    epochs, and the log's ``best`` carries that mean as ``smoothed_f1``; ``eval_tile``
    predicts validation scenes larger than it tile by tile; ``filter_radius`` (0: off) scores
    validation maps with the change probability averaged over the ``(2 r + 1)²`` window around
    each pixel (``infer.box_mean``), so the model is selected by the maps that will be used. ``bands`` records the
    1-based image bands the data were read with (multispectral TIFFs; None: all);
    ``hicd predict`` and ``hicd eval`` read the same bands by default. The model's
    input channels are those of the training images. ``model`` names the network
    (``networks.MODELS``: ``"tiny-siam-cd"``, SPEC 4, or ``"fc-siam-diff"``, SPEC 4b) and
    ``dropout`` its dropout rate (None: the network's own default; TinySiamCD has none);
    ``bottleneck`` the deepest decoder input of ``"fc-siam-diff"`` (``fc_siam.BOTTLENECKS``; None:
    ``"diff"``, the absolute difference of the two images' pooled last stages; TinySiamCD has no such choice).
    ``ema``: the decay ``d`` of an exponential moving average of the weights, updated after every
    step (``w_avg = d w_avg + (1 - d) w``); validation, model selection and ``best.h5`` then use the
    averaged weights (with the network's running BatchNorm statistics), which smooths the
    epoch-to-epoch jumps of a small validation set; ``last.h5`` keeps the trained weights and the
    average (as the optimizer's ``ema`` slot), so runs resume bit for bit. None: off.
    ``ema_warmup``: the decay at update ``t`` of the run (0, 1, ...) is ``min(ema, (1 + t) / (10 + t))``
    instead of ``ema`` throughout (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``): the
    average starts from the first steps' weights rather than dragging the initial ones along (at 0.99
    and one step, 0.99 of the average would still be the initialisation after 18 steps and a third of it
    after 100), and reaches ``ema`` after ``(10 ema - 1) / (1 - ema)`` updates (890 for 0.99).
    ``precise_bn``: before each validation, BatchNorm's statistics of the weights about to be
    validated (the average with ``ema``) are estimated afresh as the equal-weight mean over this many
    training batches, the same batches every epoch (drawn like the training ones from their own
    generator, seeded by ``seed``), instead of the running statistics, which the last few training
    batches dominate and which belong to the trained, not the averaged, weights; ``best.h5`` keeps
    them. The training itself is unchanged (``last.h5`` keeps the running statistics). 0: off.
    ``threads``: host threads for the convolutions, BatchNorm and ReLU on NumPy
    (``backend.conv_threads``; more than one needs threadpoolctl, the ``cpu`` extra, and holds
    BLAS at one thread while training);
    each image's values are the same, weight gradients move by float32 rounding against one
    thread. CuPy ignores it.
    """

    role: str = "teacher"
    setting: str | None = None
    epochs: int = 10
    batch_size: int = 8
    crop: int | None = None
    augment: bool = True
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-2
    schedule: str = "cosine"
    warmup_steps: int = 20
    dice_weight: float = 0.0
    ignore_index: int | None = None
    pos_weight: float | str | None = None
    normalize: bool | str = False
    change_crop_rate: float = 0.0
    colour_jitter: float = 0.0
    pair_degrade: str | None = None
    pair_degrade_rate: float = 0.0
    patience: int | None = None
    min_epochs: int = 0
    smoothing: int = 1
    eval_tile: int | None = None
    filter_radius: int = 0
    bands: tuple | None = None
    model: str = DEFAULT_MODEL
    dropout: float | None = None
    bottleneck: str | None = None
    ema: float | None = None
    ema_warmup: bool = False
    precise_bn: int = 0
    threads: int = 1
    widths: tuple = (16, 32, 64, 128)
    seed: int = 0
    init_seed: int | None = None
    student_init: str = "teacher"
    val_seed: int = 12345
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(method="baseline"))

    def __post_init__(self):
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        self.widths = tuple(self.widths)
        if self.bands is not None:
            self.bands = tuple(int(b) for b in self.bands)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODELS)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a rate in [0, 1) (or None: the network's default), got {self.dropout}")
        if self.bottleneck is not None and self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS} (or None: the network's default), "
                             f"got {self.bottleneck!r}")
        if self.role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {self.role!r}")
        if self.role == "student" and self.setting is None:
            raise ValueError("a student needs a quality setting")
        if self.student_init not in ("teacher", "fresh"):
            raise ValueError(f"student_init must be 'teacher' or 'fresh', got {self.student_init!r}")
        if self.init_seed is not None:
            if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, numbers.Integral) \
                    or self.init_seed < 0:
                raise ValueError(f"init_seed must be a non-negative integer (or None: seed), got {self.init_seed!r}")
            if self.role == "student" and self.student_init == "teacher":
                raise ValueError("init_seed is for a run that starts from its own initial weights; this student "
                                 "starts from the teacher's (student_init='teacher')")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.ema is not None and not (isinstance(self.ema, float) and 0.0 < self.ema < 1.0):
            raise ValueError(f"ema must be a decay in (0, 1) (or None: off), got {self.ema!r}")
        if not (isinstance(self.precise_bn, int) and self.precise_bn >= 0):
            raise ValueError(f"precise_bn must be a number of batches >= 0 (0: off), got {self.precise_bn!r}")
        if self.ema_warmup and self.ema is None:
            raise ValueError("ema_warmup warms up the weight average: it needs ema (a decay in (0, 1))")
        if self.normalize not in (True, False, "image"):
            raise ValueError(f"normalize must be True (the training set's statistics), False or 'image' (each "
                             f"image by its own), got {self.normalize!r}")
        if self.pos_weight is not None and self.pos_weight != "auto" and not (
                isinstance(self.pos_weight, (int, float)) and 0 < self.pos_weight < float("inf")):
            raise ValueError(f"pos_weight must be a positive finite number or 'auto', got {self.pos_weight!r}")
        if not 0.0 <= self.change_crop_rate <= 1.0:
            raise ValueError(f"change_crop_rate must be in [0, 1], got {self.change_crop_rate}")
        if isinstance(self.colour_jitter, bool) or not 0.0 <= self.colour_jitter < 1.0:
            raise ValueError(f"colour_jitter must be a strength in [0, 1), got {self.colour_jitter!r}")
        if isinstance(self.pair_degrade_rate, bool) or not 0.0 <= self.pair_degrade_rate <= 1.0:
            raise ValueError(f"pair_degrade_rate must be a share in [0, 1], got {self.pair_degrade_rate!r}")
        if self.pair_degrade_rate > 0 and self.role != "teacher":
            raise ValueError("pair_degrade_rate degrades both images of a teacher's training crops; a student's "
                             "t2 is degraded by its setting (set pair_degrade_rate to 0)")
        if self.pair_degrade_rate > 0 and self.pair_degrade not in SETTINGS:
            raise ValueError(f"pair_degrade must be a quality setting, one of {SETTINGS}, when pair_degrade_rate > 0; "
                             f"got {self.pair_degrade!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, numbers.Integral) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {self.patience}")
        if isinstance(self.min_epochs, bool) or not isinstance(self.min_epochs, numbers.Integral) \
                or self.min_epochs < 0:
            raise ValueError(f"min_epochs must be a non-negative integer (epochs), got {self.min_epochs!r}")
        if isinstance(self.smoothing, bool) or not isinstance(self.smoothing, numbers.Integral) or self.smoothing < 1:
            raise ValueError(f"smoothing must be an integer >= 1 (epochs), got {self.smoothing!r}")
        if self.eval_tile is not None and (self.eval_tile < 8 or self.eval_tile % 8):
            raise ValueError(f"eval_tile must be a positive multiple of 8, got {self.eval_tile}")
        if isinstance(self.filter_radius, bool) or not isinstance(self.filter_radius, numbers.Integral) \
                or self.filter_radius < 0:
            raise ValueError(f"filter_radius must be a non-negative integer (pixels), got {self.filter_radius!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["bands"] = None if self.bands is None else list(self.bands)
        d["distill"]["taps"] = list(self.distill.taps)
        d["distill"]["windows"] = list(self.distill.windows)
        return d


@dataclass
class FitResult:
    model: object
    history: list
    best: dict
    out_dir: object


def _make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose adamw or sgd")


def fit(cfg: TrainConfig, train_set, val_set, out_dir, *, xp=None, teacher=None, resume=False,
        progress=True, log_every=10, on_epoch=None, comm=None) -> FitResult:
    """Train a teacher or a student; write ``last.h5``, ``best.h5`` and ``log.jsonl`` into ``out_dir``.

    Parameters
    ----------
    cfg : TrainConfig
    train_set, val_set : datasets (``len`` and ``[i] -> (t1, t2, label)``)
    out_dir : path
    xp : namespace, optional (default NumPy)
    teacher : TinySiamCD, optional
        Required for students that distil or start from the teacher.
    resume : bool
        Continue from ``out_dir/last.h5`` (written at the end of every epoch); the
        run then ends bitwise where an uninterrupted run ends. The configuration
        must match the checkpoint's.
    progress : bool
        Show a tqdm progress bar (loss terms, pairs/s) when tqdm is installed.
    comm : communicator, optional
        Data-parallel training on ``comm.size`` ranks (``hicd_core.parallel.MPIComm``;
        every rank calls ``fit`` with the same arguments). ``cfg.batch_size`` is the
        global batch: every rank draws it from the same seeded stream (so the data
        order does not depend on the number of ranks) and trains on its shard
        (``train_step(..., comm=)``); validation counts are added over ranks; rank 0
        alone writes the log and the checkpoints, whose config records ``world_size``.
        A run resumes with any number of ranks.

    The folder is locked while the run writes into it (``io.run_lock``: a second run
    into the same folder fails at once), and temporary files left there by killed
    writers are removed first.

    Returns
    -------
    FitResult with the trained model (last epoch), the history (one dict per
    epoch, as in ``log.jsonl``) and the best validation metrics.
    """
    writer = comm is None or comm.rank == 0
    if comm is not None:
        shard(cfg.batch_size, comm)  # a batch that does not split evenly fails on every rank, before any file
        comm.prepare(xp)  # the transport for this backend's arrays (NCCL on CuPy where it can), on every rank
    with run_lock(out_dir) if writer else contextlib.nullcontext(), backend.conv_threads(cfg.threads):
        if writer:
            remove_stale_temps(out_dir)
        return _fit(cfg, train_set, val_set, Path(out_dir), xp=xp, teacher=teacher, resume=resume, progress=progress,
                    log_every=log_every, on_epoch=on_epoch, comm=comm)


@dataclass
class _Run:
    """The state of one training run: what ``fit``'s named steps share."""

    cfg: TrainConfig
    out_dir: Path
    model: object  # TinySiamCD or FCSiamDiff
    optimizer: object
    rng: object
    batches: TrainBatches
    schedule: object
    val_view: object
    teacher: object
    xp: object
    comm: object = None
    pos_weight: float | None = None  # the BCE's change-pixel weight (cfg.pos_weight, or the "auto" value)
    ema: dict | None = None  # the averaged weights (cfg.ema), name -> array
    epoch: int = 0
    step: int = 0
    best: dict = field(default_factory=lambda: {"f1": -1.0})
    history: list = field(default_factory=list)
    stopped: bool = False

    @property
    def writer(self):
        """Whether this process writes files (the only one, or rank 0)."""
        return self.comm is None or self.comm.rank == 0

    @property
    def paths(self):
        return self.out_dir / "last.h5", self.out_dir / "best.h5", self.out_dir / "log.jsonl"

    def non_finite(self, exc, where):
        """The one message of a non-finite stop: role, step, epoch and what was non-finite."""
        return NonFiniteError(f"{self.cfg.role} training stopped {where} step {self.step} "
                              f"(epoch {self.epoch + 1}): {exc}")


def _setup(cfg, train_set, val_set, out_dir, xp, teacher, comm=None) -> _Run:
    """A fresh run: model (from the teacher when asked), optimizer, data stream, schedule."""
    student = cfg.role == "student"
    needs_teacher = student and (cfg.student_init == "teacher" or cfg.distill.method != "baseline")
    if needs_teacher and teacher is None:
        raise ValueError("this student configuration needs a trained teacher")
    from_teacher = needs_teacher and cfg.student_init == "teacher"
    in_channels = _band_count(train_set)
    if teacher is not None and teacher.in_channels != in_channels:
        raise ValueError(f"the teacher takes {teacher.in_channels} input band(s) but the training images have "
                         f"{in_channels}")
    if from_teacher and model_name(teacher) != cfg.model:
        raise ValueError(f"a student that starts from the teacher needs the teacher's network: the teacher is "
                         f"{model_name(teacher)!r}, the student {cfg.model!r} (use student_init='fresh')")
    model = build_model(cfg.model, cfg.widths, in_channels, dropout=cfg.dropout, bottleneck=cfg.bottleneck, xp=xp,
                        seed=cfg.seed if cfg.init_seed is None else cfg.init_seed,
                        **_normalisation(cfg, train_set, teacher if from_teacher else None))
    if cfg.crop is not None and cfg.crop % model.size_multiple:
        raise ValueError(f"crop {cfg.crop} must be a multiple of {model.size_multiple} for {cfg.model!r}")
    if from_teacher:
        model.load_state_dict(teacher.state_dict(), source="teacher")
    rng = backend.host_rng(cfg.seed)
    batches = _training_batches(cfg, train_set, rng)
    schedule = make_schedule(cfg.schedule, cfg.epochs * len(batches), cfg.lr,
                             **({"warmup_steps": cfg.warmup_steps} if cfg.schedule == "cosine" else {}))
    val_view = DegradedView(val_set, cfg.setting, cfg.val_seed) if student else val_set
    pos_weight = cfg.pos_weight
    if pos_weight == "auto":  # no-change : change over the training labels
        fraction = change_fraction(_base_dataset(train_set), ignore_value=cfg.ignore_index)
        pos_weight = round((1.0 - fraction) / fraction, 4)
    ema = None if cfg.ema is None else dict(model.params)  # arrays are replaced, never written in place
    return _Run(cfg, out_dir, model, _make_optimizer(cfg, model.params), rng, batches, schedule, val_view,
                teacher, xp, comm, pos_weight, ema)


def _training_batches(cfg, train_set, rng):
    """The training batches of ``cfg`` drawn from ``rng`` (a student's carry its degraded t2)."""
    return TrainBatches(train_set, cfg.batch_size, rng=rng, crop=cfg.crop,
                        setting=cfg.setting if cfg.role == "student" else None, augment=cfg.augment,
                        change_rate=cfg.change_crop_rate, colour=cfg.colour_jitter,
                        pair_setting=cfg.pair_degrade, pair_rate=cfg.pair_degrade_rate)


def precise_statistics(model, batches, count, *, xp, comm=None, seed=0, momentum=None):
    """BatchNorm statistics of ``model``'s weights: the equal-weight mean over ``count`` batches.

    ``batches`` is a ``TrainBatches``, cycled when it has fewer; each batch runs forward in training
    mode with ``model.bn_momentum`` ``1 / (i + 1)`` at batch ``i`` (a cumulative mean, PyTorch's
    ``momentum=None``), on this rank's shard with synchronised statistics under ``comm``. With a
    ``momentum`` instead, the model's running statistics carried on through the batches at that
    momentum (what ``count`` more training batches would leave). Returns the new buffers; the
    model's own, and its momentum, are left as they were.
    """
    kept, own = model.buffers, model.bn_momentum
    model.buffers = dict(kept)  # the forward replaces entries, never writes into them
    part = shard(batches.batch_size, comm)
    student = batches.setting is not None
    try:
        done = 0
        while done < count:
            for x1, x2_hq, x2_lq, _ in batches.epoch():
                x1_d, x2_d = (backend.from_host(a[part], xp) for a in (x1, x2_lq if student else x2_hq))
                model.bn_momentum = 1.0 / (done + 1) if momentum is None else momentum
                model.forward(x1_d, x2_d, training=True, sync=comm, rng=backend.host_rng([seed, 4, done]))
                done += 1
                if done == count:
                    break
        return model.buffers
    finally:
        model.buffers, model.bn_momentum = kept, own


def _restore(run: _Run, resume: bool) -> None:
    """Continue from ``last.h5`` (same configuration only), or refuse to overwrite a run silently."""
    last_path, _, log_path = run.paths
    if not resume and last_path.exists():
        raise ValueError(f"{run.out_dir} already holds a training run ({last_path.name}); "
                         "resume it (--resume) or choose another output folder")
    if resume and last_path.exists():
        ck = load_checkpoint(last_path)
        if not _same_config(ck["config"], run.cfg.to_dict()):
            raise ValueError(f"{last_path}: the checkpoint was written by a different configuration; "
                             "use another --out folder or the same options")
        run.model.load_state_dict(ck, source=str(last_path))
        run.optimizer.load_state_dict(_without_folded_biases(ck["optim"], run.model.params), source=str(last_path))
        if run.ema is not None:
            run.ema = _restored_average(ck, run.model, last_path)
        run.rng.bit_generator.state = ck["rng_state"]
        run.epoch, run.best = ck["extra"]["epoch"], ck["extra"]["best"]
        run.stopped = bool(ck["extra"].get("stopped", False))
        run.history = _read_log(log_path)[:run.epoch]
        run.step = run.epoch * len(run.batches)
    if run.writer:
        _write_log(log_path, run.history)


def _train_epoch(run: _Run, progress, log_every):
    """One pass over the training batches; returns the summed loss terms, the step count and the seconds."""
    cfg, xp, student = run.cfg, run.xp, run.cfg.role == "student"
    bar = Progress(len(run.batches), f"{cfg.role} epoch {run.epoch + 1}/{cfg.epochs}", progress)
    sums, count, started = {}, 0, time.perf_counter()
    part = shard(cfg.batch_size, run.comm)  # every rank draws the global batch, then keeps its shard
    for x1, x2_hq, x2_lq, label in run.batches.epoch():
        x1_d, hq_d, label_d = (backend.from_host(a[part], xp) for a in (x1, x2_hq, label))
        x2_d = backend.from_host(x2_lq[part], xp) if student else hq_d
        try:
            distill = cfg.distill.at_step(run.step, cfg.epochs * len(run.batches)) if student else None
            terms = train_step(run.model, run.optimizer, x1_d, x2_d, label_d, lr=run.schedule(run.step),
                               teacher=run.teacher, teacher_x2=hq_d, distill=distill,
                               dice_weight=cfg.dice_weight, ignore_index=cfg.ignore_index, pos_weight=run.pos_weight,
                               comm=run.comm, rng=backend.host_rng([cfg.seed, 2, run.step]))
        except NonFiniteError as exc:
            raise run.non_finite(exc, "at") from None
        if run.ema is not None:
            d = min(cfg.ema, (1.0 + run.step) / (10.0 + run.step)) if cfg.ema_warmup else cfg.ema
            run.ema = {k: run.ema[k] * d + p * (1.0 - d) for k, p in run.model.params.items()}
        for k, v in terms.items():
            sums[k] = v if k not in sums else sums[k] + v
        count += 1
        run.step += 1
        postfix = None
        if count % log_every == 0 or count == len(run.batches):
            elapsed = time.perf_counter() - started
            postfix = {k: f"{float(v) / count:.4f}" for k, v in sums.items() if "/" not in k}
            postfix["pairs/s"] = f"{count * cfg.batch_size / elapsed:.1f}"
        bar.update(1, postfix)
    bar.close()
    if run.comm is not None:  # the log shows the mean over ranks
        names = sorted(sums)
        total = run.comm.allreduce_host([float(sums[k]) for k in names])
        sums = {k: v / run.comm.size for k, v in zip(names, total.tolist())}
    return sums, count, time.perf_counter() - started


def _finish_epoch(run: _Run, sums, count, seconds) -> dict:
    """Validate, decide on early stopping, write ``best.h5`` (when improved), ``last.h5`` and the log."""
    cfg = run.cfg
    last_path, best_path, log_path = run.paths
    buffers = None
    if cfg.precise_bn:  # the same batches every epoch, apart from the training's draws
        with _averaged_weights(run.model, run.ema):
            buffers = precise_statistics(run.model, _training_batches(cfg, run.batches.dataset,
                                                                      backend.host_rng([cfg.seed, 3])),
                                         cfg.precise_bn, xp=run.xp, comm=run.comm, seed=cfg.seed)
    with _averaged_weights(run.model, run.ema, buffers):
        metrics = evaluate(run.model, run.val_view, batch_size=cfg.batch_size, ignore_index=cfg.ignore_index,
                           tile=cfg.eval_tile, comm=run.comm, filter_radius=cfg.filter_radius)
    record = {"epoch": run.epoch + 1, "step": run.step, "lr": run.schedule(run.step - 1),
              "train": {k: float(v) / count for k, v in sums.items()},
              "val": {k: metrics[k] for k in METRIC_KEYS}, "seconds": round(seconds, 3),
              "pairs_per_s": round(count * cfg.batch_size / seconds, 2)}
    if run.comm is not None:
        record["world_size"], record["transport"] = run.comm.size, run.comm.transport
    if cfg.pos_weight == "auto":
        record["pos_weight"] = run.pos_weight
    run.history.append(record)
    score = _selection_score(run.history, cfg.smoothing)
    improved = score > run.best.get("smoothed_f1", run.best["f1"])
    if improved:
        run.best = dict(record["val"], epoch=run.epoch + 1)
        if cfg.smoothing > 1:
            run.best["smoothed_f1"] = score
    run.stopped = (cfg.patience is not None and run.epoch + 1 >= cfg.min_epochs
                   and run.epoch + 1 - run.best["epoch"] >= cfg.patience)
    if run.stopped:
        record["stopped"] = True
    extra = {"epoch": run.epoch + 1, "best": run.best, "stopped": run.stopped}
    config = dict(cfg.to_dict(), world_size=1 if run.comm is None else run.comm.size)
    state = dict(step=run.step, rng_state=run.rng.bit_generator.state, config=config, extra=extra)
    if run.writer:
        try:
            if improved:  # the model selection chose: the averaged weights when averaging
                with _averaged_weights(run.model, run.ema, buffers):
                    save_checkpoint(best_path, model=run.model, optimizer=run.optimizer, **state)
            save_checkpoint(last_path, model=run.model, optimizer=_WithAverage(run.optimizer, run.ema), **state)
        except NonFiniteError as exc:
            raise run.non_finite(exc, "after") from None
        _write_log(log_path, run.history)
    run.epoch += 1
    return record


def _fit(cfg, train_set, val_set, out_dir, *, xp, teacher, resume, progress, log_every, on_epoch, comm):
    """``fit`` inside the run folder's lock: set up, restore, check the data, then epoch after epoch."""
    run = _setup(cfg, train_set, val_set, out_dir, xp if xp is not None else backend.namespace("numpy"), teacher,
                 comm)
    progress = progress and run.writer
    _restore(run, resume)
    if run.epoch < cfg.epochs and not run.stopped:  # bad samples fail now, naming the file, not in epoch 2
        validate_dataset(_base_dataset(train_set), progress=progress)
        validate_dataset(val_set, progress=progress)
    while run.epoch < cfg.epochs and not run.stopped:  # early stopping may have ended it before a resume
        sums, count, seconds = _train_epoch(run, progress, log_every)
        record = _finish_epoch(run, sums, count, seconds)
        if on_epoch is not None:
            on_epoch(record)
    return FitResult(run.model, run.history, run.best, out_dir)


@contextlib.contextmanager
def _averaged_weights(model, ema, buffers=None):
    """The model with the averaged weights ``ema`` (and BatchNorm ``buffers``) in place of its own inside the
    block (nothing changed without them)."""
    trained, running = model.params, model.buffers
    model.params = trained if ema is None else ema
    model.buffers = running if buffers is None else buffers
    try:
        yield model
    finally:
        model.params, model.buffers = trained, running


class _WithAverage:
    """The optimizer's state plus the averaged weights as its ``ema`` slot, for ``save_checkpoint``."""

    def __init__(self, optimizer, ema):
        self.optimizer, self.ema = optimizer, ema

    def state_dict(self):
        state = self.optimizer.state_dict()
        if self.ema is not None:
            state["ema"] = {k: backend.to_host(v).copy() for k, v in self.ema.items()}
        return state


def _restored_average(ck, model, path):
    """The averaged weights of ``last.h5`` (its optimizer's ``ema`` slot), on the model's device."""
    saved = (ck["optim"] or {}).get("ema")
    if not isinstance(saved, dict) or set(saved) != set(model.params):
        raise CheckpointError(f"{path}: the run averages its weights (ema) but the checkpoint holds no average "
                              "for every parameter")
    return {k: backend.from_host(saved[k], model.xp, dtype=model.dtype) for k in model.params}


def _without_folded_biases(optim_state, params):
    """An optimizer state of hicd 0.1 without the slots of the convolution biases that the model no longer
    has (``model.fold_conv_biases`` folded them into BatchNorm): such a run resumes with the bias-free network."""
    if optim_state is None:
        return None
    stale = lambda name: name.endswith(".conv.bias") and name not in params  # noqa: E731
    return {slot: ({n: a for n, a in bufs.items() if not stale(n)} if isinstance(bufs, dict) else bufs)
            for slot, bufs in optim_state.items()}


def _selection_score(history, smoothing):
    """The validation F1 that model selection compares: the mean over the last ``smoothing``
    epochs of ``history`` (fewer at the start of a run), rounded as the log rounds F1."""
    recent = [r["val"]["f1"] for r in history[-smoothing:]]
    return recent[0] if smoothing == 1 else round(sum(recent) / len(recent), 2)


def _same_config(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's configuration is the current one; a field the checkpoint does not
    know (written before the field existed) counts as equal when the current value is its default,
    so that runs of an older release still resume."""
    def with_defaults(saved, current, cls):
        defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
        return {**{k: v for k, v in defaults.items() if k in current and k not in saved}, **saved}

    free = ("world_size", "threads")  # a run resumes on any number of ranks and of host threads
    saved = {k: v for k, v in saved.items() if k not in free}
    current = {k: v for k, v in current.items() if k not in free}
    saved = with_defaults(saved, current, TrainConfig)
    if isinstance(saved.get("distill"), dict) and isinstance(current.get("distill"), dict):
        saved["distill"] = with_defaults(saved["distill"], current["distill"], DistillConfig)
    return saved == current


def _base_dataset(dataset):
    """The distinct samples behind ``Repeat`` (statistics need each scene once)."""
    inner = getattr(dataset, "dataset", None)
    return _base_dataset(inner) if inner is not None and hasattr(dataset, "times") else dataset


def _band_count(train_set) -> int:
    """Input bands of the model: those of the first training sample (a dataset checks that all agree)."""
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    return int(train_set[0][0].shape[0])


def _normalisation(cfg, train_set, teacher):
    """The input normalisation of a new model, as constructor keywords: the teacher's when starting from it,
    else each image's own (``normalize="image"``), the training set's (``normalize=True``) or none."""
    if teacher is not None:
        return {"input_mean": teacher.input_mean, "input_std": teacher.input_std,
                "per_image_norm": teacher.input_norm.per_image}
    if cfg.normalize == "image":
        return {"per_image_norm": True}
    if not cfg.normalize:
        return {}
    mean, std = channel_stats(_base_dataset(train_set))
    return {"input_mean": mean, "input_std": std}


def _read_log(path):
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: line {number} is not valid JSON ({exc.msg}); the log is damaged: "
                                      "move it away to resume from the checkpoint alone") from None
    return records


def _write_log(path, history):
    """Rewrite the JSONL log atomically (one line per finished epoch)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
