"""Confusion-matrix metrics against hand-computed values, empty classes, ignore index, backends."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core.metrics import ConfusionMatrix, change_metrics
from tests.conftest import to_xp


def test_hand_computed_confusion_matrix(xp):
    # TP=3, FP=1, FN=2, TN=4
    pred = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    label = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], np.uint8)
    m = change_metrics(to_xp(xp, pred), to_xp(xp, label))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 2, 4)
    assert m["precision"] == 75.0
    assert m["recall"] == 60.0
    assert m["f1"] == round(100 * 6 / 9, 2)
    assert m["iou"] == 50.0
    assert m["oa"] == 70.0
    pe = (4 * 5 + 6 * 5) / 100
    assert m["kappa"] == round(100 * (0.7 - pe) / (1 - pe), 2)


def test_accumulates_over_batches_like_one_matrix():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 2, (2, 8, 8)) for _ in range(3)]
    labels = [rng.integers(0, 2, (2, 8, 8)).astype(np.uint8) for _ in range(3)]
    acc = ConfusionMatrix()
    for p, t in zip(preds, labels):
        acc.update(p, t)
    assert acc.compute() == change_metrics(np.concatenate(preds), np.concatenate(labels))


def test_ignore_index_excludes_pixels():
    pred = np.array([1, 0, 1, 1])
    label = np.array([1, 0, 255, 255], np.uint8)
    m = change_metrics(pred, label, ignore_index=255)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 0, 0, 1) and m["f1"] == 100.0


@pytest.mark.parametrize(
    "pred, label, expected",
    [
        ([0, 0, 0], [0, 0, 0], dict(precision=100.0, recall=100.0, f1=100.0, iou=100.0, oa=100.0, kappa=100.0)),
        ([0, 0, 0], [1, 0, 0], dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0)),
        ([1, 0, 0], [0, 0, 0], dict(precision=0.0, recall=0.0, f1=0.0, iou=0.0)),
        ([1, 1, 1], [1, 1, 1], dict(precision=100.0, recall=100.0, f1=100.0, iou=100.0, kappa=100.0)),
    ],
)
def test_empty_class_conventions(pred, label, expected):
    m = change_metrics(np.array(pred), np.array(label, np.uint8))
    for k, v in expected.items():
        assert m[k] == v, k


def test_no_valid_pixels_and_shape_errors():
    with pytest.raises(ValueError, match="no valid pixels"):
        change_metrics(np.array([1]), np.array([255], np.uint8), ignore_index=255)
    with pytest.raises(ValueError, match="pred shape"):
        change_metrics(np.zeros(3), np.zeros(4, np.uint8))
    m = change_metrics(np.zeros((2, 1, 4, 4)), np.zeros((2, 4, 4), np.uint8))  # (N, 1, H, W) predictions
    assert m["oa"] == 100.0
