"""Change-detection metrics from one confusion matrix accumulated over a whole evaluation set.

Change is the positive class. Precision, recall, F1 and IoU are those of the
change class alone (not averaged with the no-change class, a common source of
confusion between toolboxes); OA is overall pixel accuracy; kappa is Cohen's
kappa. All are in percent, rounded to two decimals, as CD papers report them.

Empty-class conventions (a denominator of zero): precision is 100 when there are
also no missed changes (FN = 0) and 0 otherwise; recall is 100 when there are
also no false alarms (FP = 0) and 0 otherwise; F1 and IoU are 100 when TP = FP =
FN = 0 (nothing to find and nothing found); kappa is 100 when the expected
agreement is 1 and the observed agreement is too, 0 otherwise. An evaluation
with no valid pixel raises ``ValueError``.
"""

from __future__ import annotations

import math

from .backend import array_namespace, to_host

__all__ = ["ConfusionMatrix", "change_metrics", "METRIC_KEYS"]

METRIC_KEYS = ("precision", "recall", "f1", "iou", "oa", "kappa")


class ConfusionMatrix:
    """Accumulates TP, FP, FN, TN of binary change maps (any array-API backend).

    ``update(pred, label, ignore_index=None)`` with ``pred`` and ``label`` of the
    same number of elements, values {0, 1} (pred may be bool); pixels whose label
    equals ``ignore_index`` are excluded. Counts are Python ints (one host
    transfer per update).
    """

    def __init__(self):
        self.tp = self.fp = self.fn = self.tn = 0

    def update(self, pred, label, ignore_index=None):
        xp = array_namespace(pred, label)
        if tuple(pred.shape) != tuple(label.shape):
            if math.prod(pred.shape) != math.prod(label.shape):
                raise ValueError(f"pred shape {tuple(pred.shape)} and label shape {tuple(label.shape)} differ")
            pred = xp.reshape(pred, label.shape)
        p = pred != 0 if pred.dtype != xp.bool else pred
        t = label == 1
        valid = label != ignore_index if ignore_index is not None else xp.ones_like(t)
        p = p & valid
        t = t & valid
        counts = xp.stack([
            xp.sum(xp.astype(p & t, xp.int64)),
            xp.sum(xp.astype(p & ~t, xp.int64)),
            xp.sum(xp.astype(~p & t, xp.int64)),
            xp.sum(xp.astype(valid, xp.int64)),
        ])
        tp, fp, fn, total = (int(v) for v in to_host(counts))
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += total - tp - fp - fn
        return self

    @property
    def total(self):
        return self.tp + self.fp + self.fn + self.tn

    def compute(self) -> dict:
        """The metrics in percent with two decimals, plus the raw counts."""
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        total = self.total
        if total == 0:
            raise ValueError("no valid pixels were evaluated")
        precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
        recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
        iou = tp / (tp + fp + fn) if tp + fp + fn else 1.0
        oa = (tp + tn) / total
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (total * total)
        kappa = (oa - pe) / (1 - pe) if pe < 1 else (1.0 if oa == 1 else 0.0)
        out = {k: round(100.0 * v, 2) for k, v in zip(METRIC_KEYS, (precision, recall, f1, iou, oa, kappa))}
        out.update(tp=tp, fp=fp, fn=fn, tn=tn)
        return out


def change_metrics(pred, label, ignore_index=None) -> dict:
    """Metrics of one prediction (or a whole stacked set): keys ``precision, recall, f1, iou, oa, kappa``."""
    return ConfusionMatrix().update(pred, label, ignore_index).compute()
