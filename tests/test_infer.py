"""infer.py: the symmetries of the square and test-time averaging (``tta``)."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core import backend
from hicd_core.data import ArrayDataset
from hicd_core.fc_siam import FCSiamDiff
from hicd_core.infer import (SYMMETRIES, dihedral, dihedral_inverse, evaluate, predict_logits, predict_probability,
                             stream_probability)
from hicd_core.metrics import ConfusionMatrix
from hicd_core.model import TinySiamCD
from hicd_core.data.raster import ArraySource

xp = backend.namespace("numpy")


def test_the_eight_symmetries_are_those_of_the_square_and_each_is_undone():
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    expected = [np.rot90(x, r, axes=(-2, -1)) for r in range(4)]
    expected += [e[..., ::-1] for e in expected]
    got = [np.asarray(dihedral(x, k, xp=xp)) for k in range(SYMMETRIES)]
    # the same eight arrays as NumPy's quarter turns and left-right flips, all different
    assert sorted(g.tobytes() + bytes(g.shape) for g in got) == sorted(e.tobytes() + bytes(e.shape) for e in expected)
    assert len({g.tobytes() + bytes(g.shape) for g in got}) == SYMMETRIES
    for k, g in enumerate(got):
        np.testing.assert_array_equal(np.asarray(dihedral_inverse(g, k, xp=xp)), x)


@pytest.mark.parametrize("k", [-1, 8, 1.5, True, "1"])
def test_a_symmetry_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="numbered 0..7"):
        dihedral(np.zeros((2, 2)), k, xp=xp)


@pytest.mark.parametrize("model, shape", [(TinySiamCD((4, 4, 8, 8), dtype="float64", seed=1), (2, 3, 16, 24)),
                                          (FCSiamDiff((4, 4, 8, 8), dtype="float64", seed=2, dropout=0.0),
                                           (1, 3, 32, 16))])
def test_averaged_logits_are_the_mean_of_the_views_and_turn_with_the_pair(model, shape):
    rng = np.random.default_rng(0)
    a, b = rng.random((2, *shape))
    one = np.asarray(predict_logits(model, a, b))
    np.testing.assert_array_equal(one, np.asarray(model.predict_logits(a, b)))
    avg = np.asarray(predict_logits(model, a, b, tta=True))
    views = [np.asarray(dihedral_inverse(model.predict_logits(dihedral(a, k, xp=xp), dihedral(b, k, xp=xp)), k, xp=xp))
             for k in range(SYMMETRIES)]
    np.testing.assert_allclose(avg, np.mean(views, axis=0), rtol=0, atol=1e-12)
    assert avg.shape == one.shape and not np.allclose(avg, one)  # a random network is not symmetric by itself
    # the average is: turning or flipping the pair turns or flips the change map with it
    for k in range(SYMMETRIES):
        turned = np.asarray(predict_logits(model, dihedral(a, k, xp=xp), dihedral(b, k, xp=xp), tta=True))
        np.testing.assert_allclose(turned, np.asarray(dihedral(avg, k, xp=xp)), rtol=0, atol=1e-10)


def test_evaluate_tiles_and_streams_average_the_same_logits():
    model = TinySiamCD((4, 4, 8, 8), seed=3)
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 3, 3, 32, 40), dtype=np.float32)
    labels = (rng.random((3, 32, 40)) < 0.3).astype(np.uint8)
    logits = np.asarray(predict_logits(model, a, b, tta=True))
    cut = float(np.median(logits))  # an untrained network calls everything change at 0.5: cut at the median
    threshold = 1 / (1 + np.exp(-cut))
    cm = ConfusionMatrix()
    cm.update(logits[:, 0] >= np.log(threshold / (1 - threshold)), labels, None)
    expected = cm.compute()
    got = evaluate(model, ArrayDataset(a, b, labels), batch_size=2, threshold=threshold, tta=True)
    assert {k: got[k] for k in ("tp", "fp", "fn", "tn")} == {k: expected[k] for k in ("tp", "fp", "fn", "tn")}
    assert got != evaluate(model, ArrayDataset(a, b, labels), batch_size=2, threshold=threshold)
    # one window covering the pair: the tiled probability is the sigmoid of the averaged logits
    square = np.asarray(predict_logits(model, a[:1, ..., :32], b[:1, ..., :32], tta=True))[0, 0]
    prob = np.asarray(predict_probability(model, a[0, ..., :32], b[0, ..., :32], tile=32, overlap=0, tta=True))
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-square)), rtol=0, atol=1e-6)
    # several windows: streamed rows equal the in-memory tiling
    tiled = np.asarray(predict_probability(model, a[1], b[1], tile=16, overlap=4, tta=True))
    streamed = np.concatenate([rows for _, rows in stream_probability(model, ArraySource(a[1]), ArraySource(b[1]),
                                                                      tile=16, overlap=4, tta=True)])
    np.testing.assert_allclose(streamed, tiled, rtol=0, atol=1e-6)
    assert not np.allclose(tiled, np.asarray(predict_probability(model, a[1], b[1], tile=16, overlap=4)))
