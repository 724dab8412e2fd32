"""FCSiamDiff: shapes and size, whole-model gradient checks (dropout and bottlenecks included), symmetry, folding,
backends."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core.fc_siam import FCSiamDiff, fc_layer_table
from tests.conftest import to_np, to_xp

SMALL = (2, 3, 4, 5)


def pair(rng, n=2, size=16, c=3):
    return rng.standard_normal((n, c, size, size)), rng.standard_normal((n, c, size, size))


def test_published_shapes_taps_and_parameter_count():
    """16/32/64/128, 2-2-3-3 blocks: about 1.35 M parameters for 3 bands (Daudt et al. 2018)."""
    model = FCSiamDiff()
    assert 1_340_000 < model.num_parameters() < 1_360_000
    blocks, ups = fc_layer_table((16, 32, 64, 128))
    assert [n for n in blocks if n.startswith("enc")] == ["enc1.0", "enc1.1", "enc2.0", "enc2.1", "enc3.0", "enc3.1",
                                                          "enc3.2", "enc4.0", "enc4.1", "enc4.2"]
    assert blocks["dec4.0"] == (256, 128) and blocks["dec4.2"] == (128, 64) and blocks["dec1.0"] == (32, 16)
    assert ups == {"up4": (128, 128), "up3": (64, 64), "up2": (32, 32), "up1": (16, 16)}
    assert not any(k.endswith("conv.bias") for k in model.params)  # BatchNorm follows every block's conv
    x1, x2 = (a.astype(np.float32) for a in pair(np.random.default_rng(0), size=32))
    logits, taps, _ = model.forward(x1, x2)
    assert logits.shape == (2, 1, 32, 32) and logits.dtype == np.float32
    for k, (c, s) in enumerate([(16, 32), (32, 16), (64, 8), (128, 4)], start=1):
        assert taps[f"E{k}"][0].shape == (2, c, s, s) and taps[f"E{k}"][1].shape == (2, c, s, s)
    assert taps["d1"].shape == (2, 16, 32, 32)
    assert model.config() == {"arch": "FCSiamDiff", "widths": [16, 32, 64, 128], "in_channels": 3, "dropout": 0.2,
                              "bottleneck": "diff"}


def test_input_and_setting_errors():
    model = FCSiamDiff(widths=SMALL)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.forward(np.zeros((1, 3, 24, 16)), np.zeros((1, 3, 24, 16)))
    with pytest.raises(ValueError, match="same shape"):
        model.forward(np.zeros((1, 3, 16, 16)), np.zeros((1, 3, 32, 16)))
    with pytest.raises(ValueError, match="dropout must be a rate"):
        FCSiamDiff(dropout=1.0)
    with pytest.raises(ValueError, match="widths must be 4"):
        FCSiamDiff(widths=(4, 4))
    with pytest.raises(ValueError, match=r"bottleneck must be one of \('diff', 't2', 'mean'\), got 'sum'"):
        FCSiamDiff(bottleneck="sum")


def whole_model_loss(model, x1, x2, G, H, seed):
    """sum(logits G) + sum over every tap of sum(tap H), with the dropout masks of ``seed``."""
    logits, taps, cache = model.forward(x1, x2, training=True, rng=np.random.default_rng(seed))
    total = np.sum(logits * G) + np.sum(taps["d1"] * H["d1"])
    for k in range(1, 5):
        total += np.sum(taps[f"E{k}"][0] * H[f"E{k}"][0]) + np.sum(taps[f"E{k}"][1] * H[f"E{k}"][1])
    return total, cache


@pytest.mark.parametrize("dropout, bottleneck", [(0.0, "diff"), (0.3, "diff"), (0.0, "t2"), (0.3, "mean")])
def test_whole_model_gradient_check_float64(dropout, bottleneck):
    rng = np.random.default_rng(1)
    model = FCSiamDiff(widths=SMALL, dtype="float64", seed=3, dropout=dropout, bottleneck=bottleneck)
    x1, x2 = pair(rng)
    logits, taps, _ = model.forward(x1, x2, rng=np.random.default_rng(9))
    G = rng.standard_normal(logits.shape)
    H = {k: (rng.standard_normal(v[0].shape), rng.standard_normal(v[1].shape)) for k, v in taps.items() if k != "d1"}
    H["d1"] = rng.standard_normal(taps["d1"].shape)
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    _, cache = whole_model_loss(model, x1, x2, G, H, seed=9)
    grads = model.backward(G, cache, tap_grads=H)
    assert set(grads) == set(model.params)

    def loss_at(params):
        model.params, model.buffers = params, {k: v.copy() for k, v in buffers.items()}
        return whole_model_loss(model, x1, x2, G, H, seed=9)[0]

    base = {k: v.copy() for k, v in model.params.items()}
    h = 1e-6
    direction = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    analytic = sum(np.sum(grads[k] * direction[k]) for k in base)
    numeric = (loss_at({k: base[k] + h * direction[k] for k in base})
               - loss_at({k: base[k] - h * direction[k] for k in base})) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    for name in base:  # every parameter along a direction of its own
        d = rng.standard_normal(base[name].shape)
        numeric = (loss_at(dict(base, **{name: base[name] + h * d}))
                   - loss_at(dict(base, **{name: base[name] - h * d}))) / (2 * h)
        assert np.sum(grads[name] * d) == pytest.approx(numeric, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("bottleneck", ["diff", "mean"])
def test_swapping_phases_leaves_logits_unchanged(bottleneck):
    """|a - b| at every skip and |a - b| or (a + b) / 2 at the bottleneck: symmetric in its two images."""
    rng = np.random.default_rng(2)
    model = FCSiamDiff(widths=SMALL, dtype="float64", dropout=0.0, bottleneck=bottleneck)
    x1, x2 = pair(rng)
    np.testing.assert_allclose(model.predict_logits(x1, x2), model.predict_logits(x2, x1), rtol=1e-12, atol=1e-12)
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    a = model.forward(x1, x2)[0]
    model.buffers = buffers
    np.testing.assert_allclose(model.forward(x2, x1)[0], a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bottleneck", ["diff", "t2", "mean"])
def test_bottleneck_is_what_the_decoder_starts_from(bottleneck):
    """``up4``'s input is |P(E4(x1)) - P(E4(x2))|, P(E4(x2)) (the published code's) or their mean."""
    rng = np.random.default_rng(7)
    x1, x2 = pair(rng, size=32)  # E4 at 4 x 4
    model = FCSiamDiff(widths=SMALL, dtype="float64", dropout=0.0, seed=4, bottleneck=bottleneck)
    _, taps, cache = model.forward(x1, x2)
    p1, p2 = (t.reshape(2, 5, 2, 2, 2, 2).max(axis=(3, 5)) for t in taps["E4"])  # 2x2 max pooling of 4x4
    expected = {"diff": np.abs(p1 - p2), "t2": p2, "mean": (p1 + p2) / 2}[bottleneck]
    up4 = cache.decoder[0][0]
    np.testing.assert_allclose(up4.x, expected, rtol=1e-12, atol=1e-12)
    swapped = model.predict_logits(x2, x1)
    assert np.allclose(model.predict_logits(x1, x2), swapped) == (bottleneck != "t2")


def test_dropout_masks_follow_the_rng_and_vanish_in_evaluation():
    rng = np.random.default_rng(3)
    model = FCSiamDiff(widths=SMALL, dtype="float64", dropout=0.5)
    x1, x2 = pair(rng)
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    runs = []
    for seed in (4, 4, 5):
        model.buffers = {k: v.copy() for k, v in buffers.items()}
        runs.append(model.forward(x1, x2, rng=np.random.default_rng(seed))[0])
    assert np.array_equal(runs[0], runs[1]) and not np.allclose(runs[0], runs[2])
    _, _, cache = model.forward(x1, x2, training=False)  # evaluation with a cache: no masks
    assert all(drop.mask is None for _, caches in cache.encoder for _, drop in caches)
    masks = [drop.mask for _, caches in model.forward(x1, x2, rng=np.random.default_rng(4))[2].encoder
             for _, drop in caches]
    assert all(m.shape[0] == 4 for m in masks)  # the stacked pair
    assert {float(v) for m in masks for v in np.unique(m)} <= {0.0, 2.0}


class _Rank:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_dropout_masks_of_a_shard_are_the_global_batchs():
    """Two ranks of two pairs each draw the masks of the four-pair global batch and keep their own rows."""
    model = FCSiamDiff(widths=SMALL, dtype="float64", dropout=0.5)
    whole = model._mask_source(4, np.random.default_rng(6), None)
    shards = [model._mask_source(2, np.random.default_rng(6), _Rank(r, 2)) for r in (0, 1)]
    for rows in (8, 4):  # an encoder block (the stacked pair), then a decoder block
        full = to_np(whole(rows, 3))
        parts = [to_np(s(rows // 2, 3)) for s in shards]
        if rows == 8:  # t1 rows 0-3, then t2 rows 4-7
            expected = [np.concatenate([full[0:2], full[4:6]]), np.concatenate([full[2:4], full[6:8]])]
        else:
            expected = [full[0:2], full[2:4]]
        for got, want in zip(parts, expected):
            np.testing.assert_array_equal(got, want)


def test_folded_evaluation_forward_matches_unfolded(xp):
    rng = np.random.default_rng(4)
    model = FCSiamDiff(widths=SMALL, dtype="float64", seed=2, xp=xp)
    for name in model.buffers:
        model.buffers[name] = to_xp(xp, rng.uniform(0.5, 1.5, model.buffers[name].shape))
    for name in model.params:
        if name.endswith(("bn.weight", "bn.bias", "up1.bias")):
            model.params[name] = to_xp(xp, rng.standard_normal(model.params[name].shape))
    x1, x2 = (to_xp(xp, a) for a in pair(rng))
    logits, taps, cache = model.forward(x1, x2, training=False)
    folded, ftaps, none = model.forward(x1, x2, training=False, keep_cache=False)
    assert none is None and cache is not None
    np.testing.assert_allclose(to_np(folded), to_np(logits), rtol=1e-10, atol=1e-12)
    for k in ("E1", "E2", "E3", "E4"):
        np.testing.assert_allclose(to_np(ftaps[k][1]), to_np(taps[k][1]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(ftaps["d1"]), to_np(taps["d1"]), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip():
    a, b = FCSiamDiff(widths=SMALL, seed=0), FCSiamDiff(widths=SMALL, seed=1)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


@pytest.mark.parametrize("network", ["tiny-siam-cd", "fc-siam-diff"])
def test_per_image_normalisation_standardises_each_image_and_is_saved(network, tmp_path):
    from hicd_core import io
    from hicd_core.networks import build_model, load_model

    rng = np.random.default_rng(7)
    model = build_model(network, SMALL, per_image_norm=True, dtype="float64")
    x = rng.random((3, 3, 16, 16)) * 0.3 + 0.2
    y = model.input_norm(x)
    want = (x - x.mean(axis=(2, 3), keepdims=True)) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-4)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    # a brighter, more contrasted copy of an image is the same input after normalisation (up to the floor)
    np.testing.assert_allclose(model.input_norm(x * 2.0 + 0.1), model.input_norm(x), rtol=0.02, atol=0.02)
    assert model.config()["per_image_norm"] is True
    io.save_checkpoint(tmp_path / "m.h5", model=model)
    loaded, _ = load_model(tmp_path / "m.h5")
    assert loaded.input_norm.per_image and loaded.input_mean is None
    with pytest.raises(ValueError, match="per-image normalisation takes no input_mean"):
        build_model(network, SMALL, per_image_norm=True, input_mean=[0.0] * 3, input_std=[1.0] * 3)
