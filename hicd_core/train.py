"""Training steps for the teacher and the students.

``train_step`` is one optimisation step of a TinySiamCD on a batch: task loss
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

from dataclasses import dataclass, field

from .backend import all_finite
from .distill import feature_mse_loss, hicd_loss
from .errors import NonFiniteError
from .functional import bce_with_logits, soft_dice

__all__ = ["DistillConfig", "train_step", "default_windows", "METHODS"]

METHODS = ("baseline", "hicd", "feature-mse")


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
    ``use_change`` switches the change-feature terms on.
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
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown student method {self.method!r}; choose one of {METHODS}")
        self.taps, self.windows = tuple(self.taps), tuple(self.windows)
        if len(self.taps) != len(self.windows):
            raise ValueError(f"{len(self.taps)} taps but {len(self.windows)} windows")


def _distill(cfg: DistillConfig, taps, teacher_taps):
    """Distillation loss, its terms and the tap gradients (already scaled by ``cfg.weight``)."""
    if cfg.method == "hicd":
        loss, grads = hicd_loss(
            [taps[t] for t in cfg.taps], [teacher_taps[t] for t in cfg.taps],
            taps["d1"] if cfg.use_change else None, teacher_taps["d1"] if cfg.use_change else None,
            windows=cfg.windows, change_window=cfg.change_window, w_self=cfg.w_self, w_cross=cfg.w_cross,
            w_global=cfg.w_global, kind=cfg.kind, tau=cfg.tau, check_finite=False,
        )
        tap_grads = {t: (g1 * cfg.weight, g2 * cfg.weight) for t, (g1, g2) in zip(cfg.taps, grads["sem"])}
        if grads["chg"] is not None:
            tap_grads["d1"] = grads["chg"] * cfg.weight
        return loss * cfg.weight, grads["terms"], tap_grads
    # feature-mse: both phases of each semantic tap, plus d1
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


def train_step(model, optimizer, x1, x2, label, *, lr=None, teacher=None, teacher_x2=None,
               distill: DistillConfig | None = None, dice_weight=0.0, ignore_index=None, check_finite=True):
    """One optimisation step; returns a dict of 0-d loss arrays (no host sync besides the finiteness check).

    Parameters
    ----------
    model : TinySiamCD (updated in place: parameters, BatchNorm buffers)
    optimizer : AdamW or SGD over ``model.params``
    x1, x2 : arrays (N, 3, H, W)
        The pair the model sees (for a student, ``x2`` is the low-quality image).
    label : array (N, H, W) of {0, 1} (or ``ignore_index``)
    lr : float, optional
        Learning rate of this step (schedules); the optimizer's own if None.
    teacher : TinySiamCD, optional
        Frozen teacher, run in evaluation mode on ``(x1, teacher_x2)``.
    teacher_x2 : array, optional
        High-quality t2 for the teacher (default ``x2``).
    distill : DistillConfig, optional
        Required with a teacher unless its method is ``baseline``.
    dice_weight : float
        Weight of the soft Dice term added to BCE (0: off).
    check_finite : bool
        Raise ``NonFiniteError`` naming the term or the parameter if the loss or
        any gradient is NaN/inf (one device sync per step).

    Returns
    -------
    dict name -> 0-d array: ``loss`` (total), ``bce``, optionally ``dice``, ``distill``
    and the distillation terms.
    """
    logits, taps, cache = model.forward(x1, x2, training=True)
    loss, dlogits = bce_with_logits(logits, label, ignore_index=ignore_index)
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
        _, teacher_taps, _ = teacher.forward(x1, x2 if teacher_x2 is None else teacher_x2, training=False)
        d_loss, d_terms, tap_grads = _distill(distill, taps, teacher_taps)
        terms["distill"] = d_loss
        terms.update({f"distill/{k}": v for k, v in d_terms.items()})
        loss = loss + d_loss
    terms["loss"] = loss
    grads = model.backward(dlogits, cache, tap_grads)
    if check_finite and not all_finite(loss, *grads.values()):
        bad = [k for k, v in terms.items() if not all_finite(v)]
        if bad:
            raise NonFiniteError(f"non-finite loss term(s): {', '.join(bad)}")
        bad = [k for k, v in grads.items() if not all_finite(v)]
        raise NonFiniteError(f"non-finite gradient for parameter(s): {', '.join(bad)}")
    optimizer.step(model.params, grads, lr=lr)
    return terms

