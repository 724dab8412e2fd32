"""Self-, cross- and global correlation: parity with reference/, gradients, properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.correlation as ref
from hicd_core import (
    cross_correlation,
    cross_correlation_backward,
    cross_correlation_forward,
    global_correlation,
    global_correlation_backward,
    global_correlation_forward,
    self_correlation,
    self_correlation_backward,
    self_correlation_forward,
)
from tests.conftest import assert_close, to_np, to_xp


@st.composite
def feature_shapes(draw, max_n=2, max_c=4):
    """(N, C, H, W) and a window that tiles H x W (None: one window)."""
    window = draw(st.sampled_from([None, 1, 2, 3, 4]))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    if window is None:
        h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    else:
        h, w = window * draw(st.integers(1, 2)), window * draw(st.integers(1, 2))
    return (n, c, h, w), window


def features(seed, shape, offset=0.0):
    return np.random.default_rng(seed).standard_normal(shape) + offset


seeds = st.integers(0, 2**31 - 1)


@given(feature_shapes(), seeds)
def test_self_correlation_matches_reference(xp, shape_window, seed):
    shape, window = shape_window
    f = features(seed, shape)
    R, cache = self_correlation_forward(to_xp(xp, f), window)
    assert_close(R, ref.self_correlation(f, window), xp, dtype="float64")
    dR = np.random.default_rng(seed + 1).standard_normal(R.shape)
    df = self_correlation_backward(to_xp(xp, dR), cache)
    assert_close(df, ref.self_correlation_grad(dR, f, window), xp, dtype="float64")


@given(feature_shapes(), seeds)
def test_cross_correlation_matches_reference(xp, shape_window, seed):
    shape, window = shape_window
    f1, f2 = features(seed, shape), features(seed + 1, shape)
    R, cache = cross_correlation_forward(to_xp(xp, f1), to_xp(xp, f2), window)
    assert_close(R, ref.cross_correlation(f1, f2, window), xp, dtype="float64")
    dR = np.random.default_rng(seed + 2).standard_normal(R.shape)
    df1, df2 = cross_correlation_backward(to_xp(xp, dR), cache)
    e1, e2 = ref.cross_correlation_grad(dR, f1, f2, window)
    assert_close(df1, e1, xp, dtype="float64")
    assert_close(df2, e2, xp, dtype="float64")


@given(feature_shapes(max_n=4), seeds)
def test_global_correlation_matches_reference(xp, shape_window, seed):
    shape, _ = shape_window
    f = features(seed, shape, offset=0.3)
    R, cache = global_correlation_forward(to_xp(xp, f))
    assert_close(R, ref.global_correlation(f), xp, dtype="float64")
    dR = np.random.default_rng(seed + 1).standard_normal(R.shape)
    assert_close(global_correlation_backward(to_xp(xp, dR), cache), ref.global_correlation_grad(dR, f), xp)


def central_difference(fun, x, h=1e-6):
    """Full central-difference gradient of a scalar function of one array."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = fun(x)
        x[idx] = old - h
        down = fun(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("window", [None, 2])
def test_primitives_match_central_differences(window):
    rng = np.random.default_rng(7)
    f1, f2 = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    dR = rng.standard_normal(self_correlation(f1, window).shape)
    dG = rng.standard_normal((2, 2))

    _, c = self_correlation_forward(f1, window)
    num = central_difference(lambda x: np.sum(self_correlation(x, window) * dR), f1.copy())
    np.testing.assert_allclose(self_correlation_backward(dR, c), num, rtol=1e-6, atol=1e-8)

    _, c = cross_correlation_forward(f1, f2, window)
    d1, d2 = cross_correlation_backward(dR, c)
    num1 = central_difference(lambda x: np.sum(cross_correlation(x, f2, window) * dR), f1.copy())
    num2 = central_difference(lambda x: np.sum(cross_correlation(f1, x, window) * dR), f2.copy())
    np.testing.assert_allclose(d1, num1, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(d2, num2, rtol=1e-6, atol=1e-8)

    _, c = global_correlation_forward(f1)
    num = central_difference(lambda x: np.sum(global_correlation(x) * dG), f1.copy())
    np.testing.assert_allclose(global_correlation_backward(dG, c), num, rtol=1e-6, atol=1e-8)


@given(feature_shapes(), seeds)
def test_self_correlation_is_symmetric_with_unit_diagonal(shape_window, seed):
    shape, window = shape_window
    f = features(seed, shape)
    eps = 1e-6
    R = self_correlation(f, window, eps)
    np.testing.assert_allclose(R, np.swapaxes(R, -1, -2), atol=1e-14)
    # the diagonal is |f|^2 / (|f|^2 + eps): 1 up to eps relative to the squared norm
    diag = np.diagonal(R, axis1=-2, axis2=-1)
    norms = np.sum(f * f, axis=1).min()
    assert np.all(diag <= 1.0) and np.all(diag >= 1.0 - eps / norms - 1e-12)


def features_away_from_zero(seed, shape):
    """Features whose every pixel has norm >= 0.5, so that eps = 1e-12 is negligible."""
    f = features(seed, shape)
    f[:, 0] = np.where(f[:, 0] < 0, -1.0, 1.0) * (np.abs(f[:, 0]) + 0.5)
    return f


@given(feature_shapes(), seeds, st.floats(0.01, 100.0))
def test_correlations_are_scale_invariant_and_gradient_is_orthogonal(shape_window, seed, scale):
    shape, window = shape_window
    f1, f2 = features_away_from_zero(seed, shape), features_away_from_zero(seed + 1, shape)
    eps = 1e-12  # scale invariance and orthogonality are exact at eps = 0
    np.testing.assert_allclose(self_correlation(scale * f1, window, eps), self_correlation(f1, window, eps), atol=1e-10)
    np.testing.assert_allclose(
        cross_correlation(scale * f1, f2, window, eps), cross_correlation(f1, f2, window, eps), atol=1e-10
    )
    np.testing.assert_allclose(global_correlation(scale * f1, eps), global_correlation(f1, eps), atol=1e-10)

    R, cache = self_correlation_forward(f1, window, eps)
    dR = np.random.default_rng(seed + 2).standard_normal(R.shape)
    df = self_correlation_backward(dR, cache)
    # <f(p), df(p)> = 0 for every pixel: rescaling f(p) cannot change R. Without the
    # projection it would be of the order of |dR| times the window size.
    per_pixel = np.sum(df * f1, axis=1)
    assert np.abs(per_pixel).max() <= 1e-9 * np.abs(dR).max() * R.shape[-1]


@given(st.integers(2, 5), seeds)
def test_global_correlation_permutes_with_batch(b, seed):
    f = features(seed, (b, 3, 2, 3))
    perm = np.random.default_rng(seed).permutation(b)
    np.testing.assert_allclose(global_correlation(f[perm]), global_correlation(f)[np.ix_(perm, perm)], atol=1e-14)


def test_window_layout_follows_spec():
    # A map whose channel-0 value encodes its (y, x): SC row order must be the SPEC's k, i.
    H, W, w = 4, 6, 2
    f = np.zeros((1, 2, H, W))
    f[0, 0] = 1.0
    f[0, 1] = np.arange(H * W).reshape(H, W) * 1e-3
    R = self_correlation(f, w)
    assert R.shape == (1, (H // w) * (W // w), w * w, w * w)
    np.testing.assert_allclose(R, ref.self_correlation(f, w), atol=1e-14)


def test_errors_name_shapes(xp):
    f = to_xp(xp, np.ones((1, 2, 6, 6)))
    with pytest.raises(ValueError, match=r"window 4 does not divide.*\(1, 2, 6, 6\)"):
        self_correlation(f, 4)
    with pytest.raises(ValueError, match="positive int"):
        self_correlation(f, 0)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 2, 6, 6\).*\(1, 3, 6, 6\)"):
        cross_correlation(f, to_xp(xp, np.ones((1, 3, 6, 6))))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        global_correlation(to_xp(xp, np.ones((2, 3))))


def test_outputs_stay_in_input_namespace_float32(xp):
    f = to_xp(xp, np.random.default_rng(0).standard_normal((2, 4, 4, 4)), dtype="float32")
    for R in (self_correlation(f, 2), cross_correlation(f, f, None), global_correlation(f)):
        assert_close(R, to_np(R), xp, dtype="float32")


def test_mixed_namespaces_raise():
    xs = pytest.importorskip("array_api_strict")
    f = np.ones((1, 2, 2, 2))
    with pytest.raises(TypeError, match="one array-API namespace"):
        cross_correlation(f, xs.asarray(f))
