"""TinySiamCD: shapes, whole-model gradient checks (both phases, taps), symmetry, overfitting."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core import functional as F
from hicd_core.model import TinySiamCD
from hicd_core.optim import AdamW
from tests.conftest import to_np, to_xp

SMALL = (2, 3, 4, 5)


def pair(rng, n=2, size=8, c=3):
    return rng.standard_normal((n, c, size, size)), rng.standard_normal((n, c, size, size))


def test_forward_shapes_and_taps():
    model = TinySiamCD(widths=(16, 32, 64, 128))
    x1, x2 = (a.astype(np.float32) for a in pair(np.random.default_rng(0), n=2, size=64))
    logits, taps, _ = model.forward(x1, x2)
    assert logits.shape == (2, 1, 64, 64) and logits.dtype == np.float32
    for k, (c, s) in enumerate([(16, 64), (32, 32), (64, 16), (128, 8)], start=1):
        assert taps[f"E{k}"][0].shape == (2, c, s, s) and taps[f"E{k}"][1].shape == (2, c, s, s)
    assert taps["d1"].shape == (2, 16, 64, 64)
    assert model.num_parameters() > 100_000


def test_input_errors():
    model = TinySiamCD(widths=SMALL)
    with pytest.raises(ValueError, match="same shape"):
        model.forward(np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 16, 8)))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.forward(np.zeros((1, 3, 12, 8)), np.zeros((1, 3, 12, 8)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.forward(np.zeros((1, 4, 8, 8)), np.zeros((1, 4, 8, 8)))


def whole_model_loss(model, x1, x2, G, H):
    """A scalar touching the logits and every tap: sum(logits G) + sum_taps sum(tap H_tap)."""
    logits, taps, cache = model.forward(x1, x2, training=True)
    total = np.sum(logits * G)
    for k in range(1, 5):
        total += np.sum(taps[f"E{k}"][0] * H[f"E{k}"][0]) + np.sum(taps[f"E{k}"][1] * H[f"E{k}"][1])
    total += np.sum(taps["d1"] * H["d1"])
    return total, cache


def test_whole_model_gradient_check_float64():
    rng = np.random.default_rng(1)
    model = TinySiamCD(widths=SMALL, dtype="float64", seed=3)
    x1, x2 = pair(rng)
    logits, taps, _ = model.forward(x1, x2)
    G = rng.standard_normal(logits.shape)
    H = {k: (rng.standard_normal(v[0].shape), rng.standard_normal(v[1].shape)) for k, v in taps.items() if k != "d1"}
    H["d1"] = rng.standard_normal(taps["d1"].shape)
    buffers = {k: v.copy() for k, v in model.buffers.items()}

    _, cache = whole_model_loss(model, x1, x2, G, H)
    grads = model.backward(G, cache, tap_grads=H)
    assert set(grads) == set(model.params)

    def loss_at():
        model.buffers = {k: v.copy() for k, v in buffers.items()}
        return whole_model_loss(model, x1, x2, G, H)[0]

    # directional derivative along a random direction in all parameters at once
    direction = {k: rng.standard_normal(v.shape) for k, v in model.params.items()}
    analytic = sum(np.sum(grads[k] * direction[k]) for k in model.params)
    base = {k: v.copy() for k, v in model.params.items()}
    h = 1e-6
    vals = []
    for sign in (1, -1):
        model.params = {k: base[k] + sign * h * direction[k] for k in base}
        vals.append(loss_at())
    numeric = (vals[0] - vals[1]) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6)

    # a few single entries of every parameter, checked one by one
    for name in base:
        flat = base[name].reshape(-1)
        for idx in rng.choice(flat.size, size=min(2, flat.size), replace=False):
            vals = []
            for sign in (1, -1):
                p = base[name].copy().reshape(-1)
                p[idx] += sign * h
                model.params = dict(base, **{name: p.reshape(base[name].shape)})
                vals.append(loss_at())
            numeric = (vals[0] - vals[1]) / (2 * h)
            analytic = grads[name].reshape(-1)[idx]
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-7), (name, idx)  # FD noise ~1e-8


def test_swapping_phases_leaves_logits_unchanged():
    rng = np.random.default_rng(2)
    model = TinySiamCD(widths=SMALL, dtype="float64")
    x1, x2 = pair(rng)
    a = model.predict_logits(x1, x2)
    b = model.predict_logits(x2, x1)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    buffers = {k: v.copy() for k, v in model.buffers.items()}
    a = model.forward(x1, x2)[0]
    model.buffers = buffers
    np.testing.assert_allclose(model.forward(x2, x1)[0], a, rtol=1e-10, atol=1e-12)


def test_folded_evaluation_forward_matches_unfolded(xp):
    """keep_cache=False folds each BatchNorm into its convolution: same logits and taps, no cache."""
    rng = np.random.default_rng(4)
    model = TinySiamCD(widths=SMALL, dtype="float64", seed=2, xp=xp)
    for name in model.buffers:  # non-trivial running statistics
        model.buffers[name] = to_xp(xp, rng.uniform(0.5, 1.5, model.buffers[name].shape))
    for name in model.params:
        if name.endswith(("bn.weight", "bn.bias", "conv.bias")):
            model.params[name] = to_xp(xp, rng.standard_normal(model.params[name].shape))
    x1, x2 = (to_xp(xp, a) for a in pair(rng, size=16))
    logits, taps, cache = model.forward(x1, x2, training=False)
    folded, ftaps, none = model.forward(x1, x2, training=False, keep_cache=False)
    assert none is None and cache is not None
    np.testing.assert_allclose(to_np(folded), to_np(logits), rtol=1e-10, atol=1e-12)
    for k in ("E1", "E2", "E3", "E4"):
        for i in (0, 1):
            np.testing.assert_allclose(to_np(ftaps[k][i]), to_np(taps[k][i]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(ftaps["d1"]), to_np(taps["d1"]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(model.predict_logits(x1, x2)), to_np(logits), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="evaluation only"):
        model.forward(x1, x2, training=True, keep_cache=False)


@pytest.mark.parametrize("network, size", [("tiny-siam-cd", 8), ("fc-siam-diff", 16)])
def test_backends_agree(xp, network, size):
    """Both networks on every backend, dropout masks included (drawn on the host from the same rng)."""
    from hicd_core.networks import build_model

    rng = np.random.default_rng(3)
    x1, x2 = pair(rng, size=size)
    ref_model = build_model(network, SMALL, dtype="float64", seed=1)
    model = build_model(network, SMALL, dtype="float64", seed=1, xp=xp)
    logits_ref, _, cache_ref = ref_model.forward(x1, x2, rng=np.random.default_rng(2))
    logits, taps, cache = model.forward(to_xp(xp, x1), to_xp(xp, x2), rng=np.random.default_rng(2))
    np.testing.assert_allclose(to_np(logits), logits_ref, rtol=1e-10, atol=1e-12)
    dl = rng.standard_normal(logits_ref.shape)
    g_ref = ref_model.backward(dl, cache_ref)
    g = model.backward(to_xp(xp, dl), cache)
    for k in g_ref:
        np.testing.assert_allclose(to_np(g[k]), g_ref[k], rtol=1e-9, atol=1e-11, err_msg=k)


def test_state_dict_round_trip_and_errors():
    from hicd_core import CheckpointError

    a, b = TinySiamCD(widths=SMALL, seed=0), TinySiamCD(widths=SMALL, seed=1)
    b.load_state_dict(a.state_dict())
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    bad = a.state_dict()
    bad["params"]["head.bias"] = np.zeros(2, np.float32)
    before = {k: v.copy() for k, v in b.params.items()}
    with pytest.raises(CheckpointError, match=r"head.bias has shape \(2,\), expected \(1,\)"):
        b.load_state_dict(bad)
    assert all(np.array_equal(before[k], b.params[k]) for k in before)  # nothing half-loaded


@pytest.mark.parametrize("network", ["tiny-siam-cd", "fc-siam-diff"])
def test_overfits_one_batch(network):
    from hicd_core.networks import build_model

    rng = np.random.default_rng(4)
    model = build_model(network, (8, 8, 16, 16), seed=0, dropout=0.0 if network == "fc-siam-diff" else None)
    x1 = rng.random((4, 3, 16, 16)).astype(np.float32)
    x2 = x1.copy()
    label = np.zeros((4, 16, 16), np.uint8)
    label[:, 4:10, 3:9] = 1
    x2[:, :, 4:10, 3:9] = rng.random((4, 3, 6, 6))
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        logits, _, cache = model.forward(x1, x2)
        loss, dlogits = F.bce_with_logits(logits, label)
        losses.append(float(loss))
        opt.step(model.params, model.backward(dlogits, cache))
    assert losses[-1] < 0.25 * losses[0], losses
