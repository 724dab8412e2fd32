"""infer.py: the symmetries of the square and test-time averaging (``tta``)."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core import backend
from hicd_core.data import ArrayDataset
from hicd_core.fc_siam import FCSiamDiff
from hicd_core.infer import (SYMMETRIES, box_mean, choose_threshold, dihedral, dihedral_inverse, evaluate, filtered_rows,
                             predict_logits, predict_probability, stream_probability, threshold_metrics)
from hicd_core.metrics import ConfusionMatrix
from hicd_core.model import TinySiamCD
from hicd_core.train import TrainConfig
from hicd_core.data.raster import ArraySource

from .conftest import assert_close, to_xp

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


# --------------------------------------------------------------------------- filter_radius: the window mean of the map


@pytest.mark.parametrize("shape, radius", [((5, 7), 1), ((30, 20), 8), ((2, 3, 9, 6), 4), ((4, 3), 7), ((6, 6), 0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_box_mean_is_scipy_s_uniform_filter_with_mirrored_borders(xp, shape, radius, dtype):
    from scipy.ndimage import uniform_filter

    prob = np.random.default_rng(radius).random(shape).astype(dtype)
    window = [1] * (len(shape) - 2) + [2 * radius + 1] * 2  # radius 7 on a 4 x 3 map mirrors more than once
    expected = uniform_filter(prob.astype(np.float64), size=window, mode="reflect")
    assert_close(box_mean(to_xp(xp, prob), radius), expected, xp, dtype=dtype, rtol=0,
                 atol=1e-6 if dtype == "float32" else 1e-12)
    flat = np.full(shape, 0.25, dtype)  # a constant map stays what it is, borders included
    np.testing.assert_allclose(np.asarray(box_mean(flat, radius)), flat, rtol=0, atol=1e-7)


@pytest.mark.parametrize("radius", [-1, 1.5, True, "2"])
def test_a_filter_radius_that_is_not_a_pixel_count_is_refused(radius):
    with pytest.raises(ValueError, match="filter_radius must be a non-negative integer"):
        box_mean(np.zeros((4, 4)), radius)
    with pytest.raises(ValueError, match="filter_radius must be a non-negative integer"):
        evaluate(TinySiamCD((4, 4, 8, 8)), ArrayDataset(*np.zeros((2, 1, 3, 16, 16), np.float32),
                                                         np.zeros((1, 16, 16), np.uint8)), filter_radius=radius)
    with pytest.raises(ValueError, match="filter_radius must be a non-negative integer"):
        TrainConfig(filter_radius=radius)
    with pytest.raises(ValueError, match="box_mean expects an array"):
        box_mean(np.zeros(4), 1)


@pytest.mark.parametrize("chunks, radius", [([7, 13, 20, 10], 3), ([50], 8), ([1] * 50, 2), ([16] * 3 + [2], 8),
                                            ([3] * 16 + [2], 30), ([10, 40], 0)])
def test_filtered_rows_stream_the_whole_scene_s_box_mean(chunks, radius):
    prob = np.random.default_rng(len(chunks)).random((sum(chunks), 23)).astype(np.float32)
    starts = np.cumsum([0] + chunks[:-1])
    out = list(filtered_rows(((int(s), prob[s:s + c]) for s, c in zip(starts, chunks)), radius, len(prob)))
    assert [row0 for row0, _ in out] == sorted({row0 for row0, _ in out})  # top to bottom, each row once
    got = np.concatenate([rows for _, rows in out])
    assert got.dtype == np.float32 and got.shape == prob.shape
    np.testing.assert_allclose(got, np.asarray(box_mean(prob, radius)), rtol=0, atol=1e-6)


def test_evaluate_scores_the_window_mean_of_the_probability_whole_or_tiled():
    model = TinySiamCD((4, 4, 8, 8), seed=3)
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 2, 3, 32, 40), dtype=np.float32)
    labels = (rng.random((2, 32, 40)) < 0.3).astype(np.uint8)
    data = ArrayDataset(a, b, labels)
    prob = 1 / (1 + np.exp(-np.asarray(predict_logits(model, a, b))[:, 0].astype(np.float64)))
    threshold = float(np.median(prob))  # an untrained network: cut at the median
    for radius in (0, 3):
        cm = ConfusionMatrix()
        cm.update(np.asarray(box_mean(prob, radius)) >= threshold, labels, None)
        got = evaluate(model, data, batch_size=2, threshold=threshold, filter_radius=radius)
        assert {k: got[k] for k in ("tp", "fp", "fn", "tn")} == {k: cm.compute()[k] for k in ("tp", "fp", "fn", "tn")}
    assert evaluate(model, data, threshold=threshold, filter_radius=3) != evaluate(model, data, threshold=threshold)
    # scenes larger than the tile: the blended probability of the scene, then its window mean
    tiled = np.asarray(predict_probability(model, a[0], b[0], tile=16, overlap=4))
    np.testing.assert_allclose(np.asarray(predict_probability(model, a[0], b[0], tile=16, overlap=4, filter_radius=3)),
                               np.asarray(box_mean(tiled, 3)), rtol=0, atol=1e-6)


def test_the_cli_trains_with_a_filter_radius_and_eval_and_predict_default_to_it(tmp_path, capsys):
    import json

    from PIL import Image

    from hicd_core import io
    from hicd_core.cli import main as cli_main
    from hicd_core.networks import load_model

    out = tmp_path / "run"
    assert cli_main(["train", "--size", "32", "--n-train", "8", "--n-val", "8", "--epochs", "1", "--batch-size", "4",
                     "--filter-radius", "2", "--patience", "3", "--min-epochs", "5", "--no-progress",
                     "--out", str(out)]) == 0
    config = io.load_checkpoint(out / "best.h5")["config"]
    assert config["filter_radius"] == 2 and (config["patience"], config["min_epochs"]) == (3, 5)
    capsys.readouterr()
    assert cli_main(["eval", str(out / "best.h5"), "--size", "32", "--n", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["filter_radius"] == 2
    assert cli_main(["eval", str(out / "best.h5"), "--size", "32", "--n", "8", "--filter-radius", "0"]) == 0
    assert "filter_radius" not in json.loads(capsys.readouterr().out)
    rng = np.random.default_rng(4)
    pair = (rng.random((2, 40, 56, 3)) * 255).astype(np.uint8)
    for name, img in zip("ab", pair):
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    assert cli_main(["predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "m.png"),
                     "--checkpoint", str(out / "best.h5"), "--tile", "32", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["filter_radius"] == 2
    model = load_model(out / "best.h5")[0]
    t1, t2 = (np.transpose(img, (2, 0, 1)).astype(np.float32) / np.float32(255) for img in pair)
    prob = np.asarray(predict_probability(model, t1, t2, tile=32, overlap=8, filter_radius=2))
    mask = np.asarray(Image.open(tmp_path / "m.png")) > 0
    np.testing.assert_array_equal(mask, prob >= 0.5)
    raw = np.asarray(predict_probability(model, t1, t2, tile=32, overlap=8))
    assert 0 < mask.mean() < 1 and not np.array_equal(mask, raw >= 0.5)  # the window mean changed the map


def test_threshold_metrics_are_evaluates_at_each_threshold_and_choose_threshold_takes_the_best_f1():
    model = TinySiamCD((4, 4, 8, 8), seed=3)
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 3, 3, 32, 40), dtype=np.float32)
    prob = 1 / (1 + np.exp(-np.asarray(predict_logits(model, a, b))[:, 0].astype(np.float64)))
    labels = (prob > np.quantile(prob, 0.7)).astype(np.uint8)  # change where the untrained network is surest
    data = ArrayDataset(a, b, labels)
    grid = [float(t) for t in np.quantile(prob, [0.2, 0.5, 0.7, 0.9])]
    # whole images, their window mean, and scenes larger than the tile: each threshold as evaluate scores it
    for kwargs in (dict(), dict(filter_radius=2), dict(tile=16)):
        scores = threshold_metrics(model, data, grid, batch_size=2, **kwargs)
        assert list(scores) == grid
        for t in grid:
            assert scores[t] == evaluate(model, data, batch_size=2, threshold=t, **kwargs)
    best, scores = choose_threshold(model, data, grid, batch_size=2)
    assert scores[best]["f1"] == max(m["f1"] for m in scores.values()) and best == grid[2]  # the labels' own cut
    # a tie (two cuts above every probability: nothing marked, F1 0 at both): the one nearest 0.5 wins
    top = float(prob.max())
    above = [top + 2 * (1 - top) / 3, top + (1 - top) / 3]
    assert choose_threshold(model, data, above)[0] == above[1]
    for bad in (0.0, 1.0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            threshold_metrics(model, data, [0.5, bad])
    with pytest.raises(ValueError, match="at least one threshold"):
        threshold_metrics(model, data, [])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        evaluate(model, data, threshold=1.0)
