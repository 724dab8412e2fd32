"""Layer pairs: parity with reference/layers.py, central-difference gradients, no writes into inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.layers as ref
from hicd_core import conv_layouts as CL
from hicd_core import functional as F
from tests.conftest import assert_close, to_np, to_xp
from tests.test_correlation import central_difference, seeds


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-12)


@st.composite
def conv_problems(draw):
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, k - 2 * padding), 7))
    w = draw(st.integers(max(1, k - 2 * padding), 7))
    return (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w), (draw(st.integers(1, 3)), k), stride, padding


def check_conv_against_reference(xp, rng, x, w, b, stride, padding, layout="auto"):
    """Forward and backward of conv2d (in ``layout``) against the loop reference; returns the cache."""
    y, cache = F.conv2d_forward(to_xp(xp, x), to_xp(xp, w), None if b is None else to_xp(xp, b),
                                stride=stride, padding=padding, layout=layout)
    expected = ref.conv2d(x, w, b, stride, padding)
    assert_close(y, expected, xp, dtype="float64")
    dy = rng.standard_normal(expected.shape)
    dx, dw, db = F.conv2d_backward(to_xp(xp, dy), cache)
    ex, ew, eb = ref.conv2d_grad(dy, x, w, stride, padding)
    assert_close(dx, ex, xp)
    assert_close(dw, ew, xp)
    if b is None:
        assert db is None
    else:
        assert_close(db, eb, xp)
    return cache


@given(conv_problems(), seeds, st.booleans())
def test_conv2d_matches_reference(xp, problem, seed, with_bias):
    (N, C, H, W), (O, k), stride, padding = problem
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((O, C, k, k)), rng.standard_normal(O)
    check_conv_against_reference(xp, rng, x, w, b if with_bias else None, stride, padding)


def test_conv2d_central_differences():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, cache = F.conv2d_forward(x, w, b, stride=2, padding=1)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv2d_backward(dy, cache)
    loss = lambda x_, w_, b_: np.sum(F.conv2d_forward(x_, w_, b_, stride=2, padding=1)[0] * dy)  # noqa: E731
    assert rel_err(dx, central_difference(lambda v: loss(v, w, b), x.copy())) < 1e-6
    assert rel_err(dw, central_difference(lambda v: loss(x, v, b), w.copy())) < 1e-6
    assert rel_err(db, central_difference(lambda v: loss(x, w, v), b.copy())) < 1e-6


def test_conv2d_errors_name_shapes():
    x = np.zeros((1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 2, 3, 3\)"):
        F.conv2d_forward(x, np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        F.conv2d_forward(x, np.zeros((2, 3, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d_forward(x, np.zeros((2, 3, 5, 5)))


@given(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), seeds)
def test_batchnorm_training_matches_reference(xp, shape, seed):
    if shape[0] * shape[2] * shape[3] < 2:
        return
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.random(C) + 0.5
    y, cache, nm, nv = F.batchnorm2d_forward(*(to_xp(xp, a) for a in (x, gamma, beta, rm, rv)), training=True)
    assert_close(y, ref.batchnorm2d_train(x, gamma, beta), xp, dtype="float64")
    m = shape[0] * shape[2] * shape[3]
    mean = x.mean(axis=(0, 2, 3))
    var_unbiased = x.var(axis=(0, 2, 3)) * m / (m - 1)
    assert_close(nm, 0.9 * rm + 0.1 * mean, xp)
    assert_close(nv, 0.9 * rv + 0.1 * var_unbiased, xp)
    dy = rng.standard_normal(shape)
    dx, dgamma, dbeta = F.batchnorm2d_backward(to_xp(xp, dy), cache)
    ex, eg, eb = ref.batchnorm2d_train_grad(dy, x, gamma)
    assert_close(dx, ex, xp, rtol=1e-9, atol=1e-10)
    assert_close(dgamma, eg, xp)
    assert_close(dbeta, eb, xp)


def test_batchnorm_eval_uses_running_statistics_and_central_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4))
    gamma, beta, rm, rv = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3), rng.random(3) + 0.5
    y, cache, nm, nv = F.batchnorm2d_forward(x, gamma, beta, rm, rv, training=False)
    expected = (x - rm[None, :, None, None]) / np.sqrt(rv[None, :, None, None] + 1e-5) * gamma[None, :, None, None]
    np.testing.assert_allclose(y, expected + beta[None, :, None, None], rtol=1e-12)
    assert nm is rm and nv is rv
    dy = rng.standard_normal(x.shape)
    for training in (False, True):
        _, cache, _, _ = F.batchnorm2d_forward(x, gamma, beta, rm, rv, training=training)
        dx, dg, db = F.batchnorm2d_backward(dy, cache)
        f = lambda x_, g_: np.sum(F.batchnorm2d_forward(x_, g_, beta, rm, rv, training=training)[0] * dy)  # noqa: E731
        assert rel_err(dx, central_difference(lambda v: f(v, gamma), x.copy())) < 1e-6
        assert rel_err(dg, central_difference(lambda v: f(x, v), gamma.copy())) < 1e-6


def away_from_zero(rng, shape, margin=0.1):
    v = rng.standard_normal(shape)
    return np.where(v >= 0, v + margin, v - margin)


def test_elementwise_and_shape_layers_central_differences():
    rng = np.random.default_rng(2)
    x = away_from_zero(rng, (2, 3, 4, 4))
    a, b = rng.standard_normal((2, 3, 4, 4)), None
    b = a + away_from_zero(rng, a.shape)  # a - b away from the kink of |.|
    dy = rng.standard_normal(x.shape)

    _, c = F.relu_forward(x)
    num = central_difference(lambda v: np.sum(F.relu_forward(v)[0] * dy), x.copy())
    assert rel_err(F.relu_backward(dy, c), num) < 1e-8

    _, c = F.absdiff_forward(a, b)
    da, db = F.absdiff_backward(dy, c)
    assert rel_err(da, central_difference(lambda v: np.sum(F.absdiff_forward(v, b)[0] * dy), a.copy())) < 1e-8
    assert rel_err(db, central_difference(lambda v: np.sum(F.absdiff_forward(a, v)[0] * dy), b.copy())) < 1e-8

    up, _ = F.upsample2x_forward(x)
    assert up.shape == (2, 3, 8, 8) and np.array_equal(up[:, :, 1::2, ::2], x)
    dup = rng.standard_normal(up.shape)
    num = central_difference(lambda v: np.sum(F.upsample2x_forward(v)[0] * dup), x.copy())
    assert rel_err(F.upsample2x_backward(dup), num) < 1e-8

    y, c = F.concat_forward([x, a[:, :2]])
    assert y.shape == (2, 5, 4, 4)
    g1, g2 = F.concat_backward(np.arange(y.size, dtype=float).reshape(y.shape), c)
    assert g1.shape == x.shape and g2.shape == (2, 2, 4, 4) and g2[0, 0, 0, 0] == 3 * 16


@pytest.mark.parametrize("ignore", [None, 255])
def test_bce_with_logits(xp, ignore):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 1, 4, 4)) * 3
    t = (rng.random((2, 4, 4)) > 0.5).astype(np.uint8)
    if ignore is not None:
        t[0, 0, :2] = ignore
    loss, dz = F.bce_with_logits(to_xp(xp, z), to_xp(xp, t), ignore_index=ignore)
    valid = np.ones(t.shape, bool) if ignore is None else t != ignore
    p = 1 / (1 + np.exp(-z[:, 0]))
    tt = t.astype(float)
    naive = -(tt * np.log(p) + (1 - tt) * np.log(1 - p))
    assert_close(loss, naive[valid].mean(), xp, dtype="float64")
    num = central_difference(lambda v: float(F.bce_with_logits(v, t, ignore_index=ignore)[0]), z.copy())
    assert rel_err(to_np(dz), num) < 1e-6


@pytest.mark.parametrize("ignore", [None, 255])
@pytest.mark.parametrize("pos_weight", [0.5, 4.0, 19.0])
def test_weighted_bce_against_a_loop_and_central_differences(xp, ignore, pos_weight):
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2, 1, 4, 4)) * 3
    t = (rng.random((2, 4, 4)) > 0.7).astype(np.uint8)
    if ignore is not None:
        t[1, 2, :3] = ignore
    loss, dz = F.bce_with_logits(to_xp(xp, z), to_xp(xp, t), ignore_index=ignore, pos_weight=pos_weight)
    total, count = 0.0, 0
    for n, y, x in np.ndindex(t.shape):  # the definition, pixel by pixel
        if ignore is not None and t[n, y, x] == ignore:
            continue
        p = 1.0 / (1.0 + np.exp(-z[n, 0, y, x]))
        total += -(pos_weight * t[n, y, x] * np.log(p) + (1 - t[n, y, x]) * np.log(1 - p))
        count += 1
    assert_close(loss, total / count, xp, dtype="float64")
    num = central_difference(
        lambda v: float(F.bce_with_logits(v, t, ignore_index=ignore, pos_weight=pos_weight)[0]), z.copy())
    assert rel_err(to_np(dz), num) < 1e-6


def test_weighted_bce_at_weight_one_is_the_plain_loss_and_rejects_bad_weights():
    rng = np.random.default_rng(6)
    z = rng.standard_normal((1, 1, 4, 4))
    t = (rng.random((1, 4, 4)) > 0.5).astype(np.uint8)
    plain, dplain = F.bce_with_logits(z, t)
    near, dnear = F.bce_with_logits(z, t, pos_weight=1.0 + 1e-12)
    assert float(near) == pytest.approx(float(plain), rel=1e-9) and np.allclose(dnear, dplain, atol=1e-12)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pos_weight"):
            F.bce_with_logits(z, t, pos_weight=bad)


def test_bce_is_stable_for_huge_logits():
    z = np.array([[[[1e4, -1e4]]]], dtype=np.float32)
    t = np.array([[[0, 1]]], dtype=np.uint8)
    loss, dz = F.bce_with_logits(z, t)
    assert np.isfinite(loss) and float(loss) == pytest.approx(1e4, rel=1e-6)
    assert np.all(np.isfinite(dz))


def test_soft_dice_central_differences():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((2, 1, 4, 4))
    t = (rng.random((2, 4, 4)) > 0.5).astype(np.uint8)
    loss, dz = F.soft_dice(z, t)
    assert 0 <= float(loss) <= 1
    num = central_difference(lambda v: float(F.soft_dice(v, t)[0]), z.copy())
    assert rel_err(dz, num) < 1e-6


def _snapshot(obj):
    """Copies of every array reachable in a cache / tuple, for no-write checks."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, tuple):
        return tuple(_snapshot(o) for o in obj)
    return obj


def _same(a, b):
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_backward_never_writes_into_dy_inputs_or_caches(conv_layout):
    """Every layer, and the convolutions in every layout the network can take."""
    rng = np.random.default_rng(5)
    x = away_from_zero(rng, (2, 3, 6, 6))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    g, be, rm, rv = rng.standard_normal(3), rng.standard_normal(3), np.zeros(3), np.ones(3)
    cases = [
        (lambda: F.conv2d_forward(x, w, b, stride=1, padding=1, layout=conv_layout), F.conv2d_backward),  # "same"
        (lambda: F.conv2d_forward(x, w, b, stride=2, padding=1, layout=conv_layout), F.conv2d_backward),
        (lambda: F.conv2d_forward(x, w[:, :, :1, :1], b, layout=conv_layout), F.conv2d_backward),
        (lambda: F.batchnorm2d_forward(x, g, be, rm, rv, training=True)[:2], F.batchnorm2d_backward),
        (lambda: F.relu_forward(x), F.relu_backward),
        (lambda: F.absdiff_forward(x, x[::-1]), F.absdiff_backward),
        (lambda: F.upsample2x_forward(x), F.upsample2x_backward),
        (lambda: F.concat_forward([x, x]), F.concat_backward),
        (lambda: F.maxpool2x2_forward(x), F.maxpool2x2_backward),
        (lambda: F.conv_transpose2d_forward(x, w[:3], b[:3], layout=conv_layout), F.conv_transpose2d_backward),
        (lambda: F.dropout2d_forward(x, F.dropout2d_mask(rng, (2, 3), 0.5, np, dtype="float64")),
         F.dropout2d_backward),
    ]
    inputs = [x, w, b, g, be, rm, rv]
    before_inputs = [a.copy() for a in inputs]
    for forward, backward in cases:
        y, cache = forward()
        dy = rng.standard_normal(y.shape)
        dy_before, cache_before = dy.copy(), _snapshot(cache)
        backward(dy, cache)
        assert np.array_equal(dy, dy_before)
        assert _same(cache, cache_before)
    assert all(np.array_equal(a, bfr) for a, bfr in zip(inputs, before_inputs))


@pytest.fixture(params=["batched", "merged", "flat"])
def conv_layout(request):
    return request.param


@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (5, 1, 2), (3, 2, 1), (3, 1, 0), (1, 1, 0), (2, 2, 0)])
def test_conv_layouts_match_reference(xp, conv_layout, k, stride, padding):
    rng = np.random.default_rng(8)
    x, w, b = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, k, k)), rng.standard_normal(4)
    cache = check_conv_against_reference(xp, rng, x, w, b, stride, padding, conv_layout)
    same = stride == 1 and k == 2 * padding + 1 and k > 1
    assert cache.layout == ("batched" if conv_layout == "flat" and not same else conv_layout)


@pytest.mark.parametrize("size", [(6, 8), (8, 6), (7, 8), (6, 5)])
def test_flat_halving_conv_matches_reference(xp, monkeypatch, size):
    """3x3 stride-2 convolutions of even-sized inputs take the phase-wise input gradient; odd sizes fall back."""
    rng = np.random.default_rng(11)
    H, W = size
    x, w, b = rng.standard_normal((3, 4, H, W)), rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    monkeypatch.setattr(CL, "FLAT_BLOCK_BYTES", 1)  # one image per block
    cache = check_conv_against_reference(xp, rng, x, w, b, 2, 1, "flat")
    assert cache.layout == ("phases" if H % 2 == 0 and W % 2 == 0 else "batched")


def test_conv_input_grad_false_skips_dx(conv_layout):
    """``input_grad=False`` returns no dx and the same parameter gradients."""
    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    y, cache = F.conv2d_forward(x, w, b, stride=1, padding=1, layout=conv_layout)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv2d_backward(dy, cache)
    none, dw2, db2 = F.conv2d_backward(dy, cache, input_grad=False)
    assert none is None and dx is not None
    # equal up to rounding: flat takes dW from the im2col of x here (C < O), not of dy
    np.testing.assert_allclose(dw2, dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(db, db2)


@pytest.mark.parametrize("channels", [(2, 4), (4, 2), (6, 2)])  # im2col; im2col; product first (C >= 2 O)
@pytest.mark.parametrize("block", [1, 2, 3])
def test_flat_conv_in_blocks_matches_reference(xp, monkeypatch, block, channels):
    """Flat convolutions work through the batch a block of images at a time, in every form."""
    rng = np.random.default_rng(10)
    C, O = channels
    x, w, b = rng.standard_normal((3, C, 5, 6)), rng.standard_normal((O, C, 3, 3)), rng.standard_normal(O)
    monkeypatch.setattr(CL, "_blocks", lambda N, image_bytes, *, xp: [(s, min(s + block, N)) for s in range(0, N, block)])
    cache = check_conv_against_reference(xp, rng, x, w, b, 1, 1, "flat")
    assert cache.layout == "flat"
    dy = to_xp(xp, rng.standard_normal((3, O, 5, 6)))
    dx, dw, db = F.conv2d_backward(dy, cache)
    none, dw2, db2 = F.conv2d_backward(dy, cache, input_grad=False)  # for C < O, dW from the im2col of x
    assert none is None
    np.testing.assert_allclose(to_np(dw2), to_np(dw), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_np(db2), to_np(db), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [(2, 4), (4, 2), (6, 2)])  # im2col; im2col; product first (C >= 2 O)
@pytest.mark.parametrize("threads", [2, 3])
def test_flat_conv_on_host_threads_matches_reference(threads, channels):
    """Under ``backend.conv_threads`` the image blocks run on a pool (a one-block batch cut in
    pieces): the reference's values, and one thread's up to the weight gradient's rounding."""
    pytest.importorskip("threadpoolctl")
    from hicd_core import backend

    xp = F.array_namespace(np.zeros(1))
    rng = np.random.default_rng(12)
    C, O = channels
    x, w, b = rng.standard_normal((5, C, 6, 6)), rng.standard_normal((O, C, 3, 3)), rng.standard_normal(O)
    dy = rng.standard_normal((5, O, 6, 6))
    y1, cache1 = F.conv2d_forward(x, w, b, stride=1, padding=1, layout="flat")
    one = F.conv2d_backward(dy, cache1)
    weight_only = F.conv2d_backward(dy, cache1, input_grad=False)
    with backend.conv_threads(threads):
        assert backend.conv_thread_count() == threads and len(CL._thread_blocks(5, 1, xp=xp)[0]) >= threads
        cache = check_conv_against_reference(xp, rng, x, w, b, 1, 1, "flat")
        y, cache = F.conv2d_forward(x, w, b, stride=1, padding=1, layout="flat")
        many = F.conv2d_backward(dy, cache)
        weight_only_many = F.conv2d_backward(dy, cache, input_grad=False)
        # a stride-2 convolution's phase-wise input gradient runs in blocks too
        x2 = rng.standard_normal((5, C, 6, 8))
        check_conv_against_reference(xp, rng, x2, w, b, 2, 1, "flat")
    assert backend.conv_thread_count() == 1
    np.testing.assert_array_equal(y, y1)  # each image's output is computed alone either way
    np.testing.assert_array_equal(many[0], one[0])
    np.testing.assert_allclose(many[1], one[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weight_only_many[1], weight_only[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3])
def test_batchnorm_and_relu_on_host_threads_equal_one_thread(threads, dtype):
    """Under ``backend.conv_threads`` BatchNorm's and ReLU's passes run image block by image block
    on the pool: every output and gradient is bit for bit the one-thread value."""
    pytest.importorskip("threadpoolctl")
    from hicd_core import backend

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((5, 3, 6, 7)) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = (rng.standard_normal(3).astype(dtype) for _ in range(2))
    mean, var = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)

    def run():
        out = []
        for training in (True, False):
            y, cache, m, v = F.batchnorm2d_forward(x, gamma, beta, mean, var, training=training)
            out += [y, m, v, *F.batchnorm2d_backward(dy, cache)]
        r, relu_cache = F.relu_forward(x)
        return out + [r, F.relu_backward(dy, relu_cache)]

    one = run()
    with backend.conv_threads(threads):
        xp = F.array_namespace(x)
        assert F._image_split(x, xp) is not None and F._image_split(x[:1], xp) is None
        many = run()
    for a, b in zip(many, one):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_cbr_in_place_equals_the_layers_out_of_place(threads, dtype):
    """``cbr_forward`` / ``cbr_backward`` reuse the memory of their own intermediates (BatchNorm's
    ``overwrite_x`` and ``overwrite_dy``, ReLU into BatchNorm's output): every value, the sign of
    every zero included, is the one of the public layers run one after another out of place, and
    those leave their inputs untouched."""
    from hicd_core import backend

    if threads > 1:
        pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 7, 6)).astype(dtype)
    weight = (rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(dtype)
    dy = rng.standard_normal((4, 5, 7, 6)).astype(dtype)
    gamma, beta = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    mean, var = rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype)
    for training in (True, False):
        with backend.conv_threads(threads):
            y, cache, m, v = F.cbr_forward(x, weight, None, gamma, beta, mean, var, training=training)
            grads = F.cbr_backward(dy, cache)
            conv, conv_cache = F.conv2d_forward(x, weight, None, stride=1, padding=1)
            kept = [a.copy() for a in (conv, gamma, beta, mean, var)]
            bn, bn_cache, m2, v2 = F.batchnorm2d_forward(conv, gamma, beta, mean, var, training=training)
            r, relu_cache = F.relu_forward(bn)
            bn_copy, dy_copy = bn.copy(), dy.copy()
            d = F.relu_backward(dy, relu_cache)
            d_copy = d.copy()
            dbn, dgamma, dbeta = F.batchnorm2d_backward(d, bn_cache)
            dx, dweight, _ = F.conv2d_backward(dbn, conv_cache)
        for a, b in zip([y, m, v, *[g for g in grads if g is not None]], [r, m2, v2, dx, dweight, dgamma, dbeta]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
        for a, b in zip((conv, gamma, beta, mean, var, bn, dy, d), (*kept, bn_copy, dy_copy, d_copy)):
            assert a.tobytes() == b.tobytes()


def test_batchnorm_overwrite_only_where_the_dtypes_agree():
    """``overwrite_x=True`` with float64 parameters on a float32 input promotes as the out-of-place
    layer does (x is then left as it was); with one dtype it centres x in place."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    mean, var = np.zeros(3), np.ones(3)
    want = F.batchnorm2d_forward(x, gamma, beta, mean, var, training=True)[0]
    x_copy = x.copy()
    got = F.batchnorm2d_forward(x, gamma, beta, mean, var, training=True, overwrite_x=True)[0]
    assert got.dtype == want.dtype == np.float64 and got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(x, x_copy)
    same = [a.astype(np.float32) for a in (gamma, beta, mean, var)]
    want, cache, _, _ = F.batchnorm2d_forward(x, *same, training=True)
    got, own_cache, _, _ = F.batchnorm2d_forward(x_copy, *same, training=True, overwrite_x=True)
    assert got.tobytes() == want.tobytes() and own_cache.centred is x_copy
    np.testing.assert_array_equal(x_copy, cache.centred)


def test_conv_threads_checks_its_count_and_restores_it(monkeypatch):
    from hicd_core import backend

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            with backend.conv_threads(bad):
                pass
    with pytest.raises(RuntimeError, match="inside"):
        with backend.conv_threads(1):
            raise RuntimeError("inside")
    assert backend.conv_thread_count() == 1
    monkeypatch.setattr(backend, "_threadpoolctl_available", lambda: False)
    with pytest.raises(ImportError, match=r"threadpoolctl: pip install 'hicd\[cpu\]'"):
        with backend.conv_threads(2):
            pass
    assert backend.conv_thread_count() == 1


def test_flat_blocks_follow_flat_block_bytes(monkeypatch):
    """Blocks hold FLAT_BLOCK_BYTES // bytes-per-image images, at least one, at most the batch."""
    xp = F.array_namespace(np.zeros(1))
    monkeypatch.setattr(CL, "FLAT_BLOCK_BYTES", 1000)
    assert CL._blocks(5, 300, xp=xp) == [(0, 3), (3, 5)]
    assert CL._blocks(5, 4000, xp=xp) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert CL._blocks(5, 10, xp=xp) == [(0, 5)]


def test_cbr_is_conv_bn_relu_returns_its_statistics_and_folds_for_inference():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 8, 8))
    w, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    g, be = rng.random(4) + 0.5, rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5
    rm_before, rv_before = rm.copy(), rv.copy()
    y, cache, mean, var = F.cbr_forward(x, w, b, g, be, rm, rv, stride=2, training=True)
    conv, _ = F.conv2d_forward(x, w, b, stride=2, padding=1)
    bn, _, want_mean, want_var = F.batchnorm2d_forward(conv, g, be, rm, rv, training=True)
    assert np.array_equal(y, np.maximum(bn, 0)) and np.array_equal(mean, want_mean) and np.array_equal(var, want_var)
    assert np.array_equal(rm, rm_before) and np.array_equal(rv, rv_before)  # returned, never written
    dy = rng.standard_normal(y.shape)
    dx, dw, db, dg, dbe = F.cbr_backward(dy, cache)
    num = central_difference(lambda v: np.sum(F.cbr_forward(v, w, b, g, be, rm, rv, stride=2, training=True)[0] * dy),
                             x.copy())
    assert rel_err(dx, num) < 1e-6 and dw.shape == w.shape and dg.shape == g.shape
    evaluated, _, same_mean, _ = F.cbr_forward(x, w, b, g, be, rm, rv, stride=2, training=False)
    assert same_mean is rm
    assert np.allclose(F.cbr_folded_forward(x, w, b, g, be, rm, rv, stride=2), evaluated, atol=1e-12)


def test_the_layout_is_a_keyword_checked_by_name_and_the_model_passes_its_own():
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    with pytest.raises(ValueError, match="conv layout must be one of"):
        F.conv2d_forward(x, w, padding=1, layout="fast")
    assert F.conv2d_forward(x, w, padding=1, layout="merged")[1].layout == "merged"
    assert F.conv2d_forward(x, w, padding=1)[1].layout == "flat"  # "auto" on NumPy
    from hicd_core.model import TinySiamCD

    model = TinySiamCD(widths=(4, 4, 8, 8), conv_layout="batched")
    _, _, cache = model.forward(x.astype(np.float32), x.astype(np.float32))
    assert cache.head.layout == "batched" and cache.encoder[0][1].conv.layout == "batched"
    with pytest.raises(ValueError, match="conv_layout must be one of"):
        TinySiamCD(conv_layout="fast")


# --------------------------------------------------------------------------- FC-Siam-diff's layers


@pytest.mark.parametrize("conv_layout", ["batched", "merged", "flat"])
@pytest.mark.parametrize("geometry", [(3, 2, 1, 1), (3, 2, 1, 0), (2, 2, 0, 0), (3, 1, 1, 0), (1, 1, 0, 0)])
def test_conv_transpose_matches_reference(xp, conv_layout, geometry):
    """Every layout, the phases algorithm (3x3, stride 2, padding 1, output padding 1) included."""
    k, stride, padding, output_padding = geometry
    rng = np.random.default_rng(20)
    x, w, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 2, k, k)), rng.standard_normal(2)
    y, cache = F.conv_transpose2d_forward(to_xp(xp, x), to_xp(xp, w), to_xp(xp, b), stride=stride, padding=padding,
                                          output_padding=output_padding, layout=conv_layout)
    expected = ref.conv_transpose2d(x, w, b, stride, padding, output_padding)
    assert_close(y, expected, xp, dtype="float64")
    dy = rng.standard_normal(expected.shape)
    dx, dw, db = F.conv_transpose2d_backward(to_xp(xp, dy), cache)
    ex, ew, eb = ref.conv_transpose2d_grad(dy, x, w, stride, padding)
    assert_close(dx, ex, xp)
    assert_close(dw, ew, xp)
    assert_close(db, eb, xp)
    if geometry == (3, 2, 1, 1) and conv_layout == "flat" and xp.__name__.startswith("numpy"):
        assert cache.layout == "phases"
    none, dw2, _ = F.conv_transpose2d_backward(to_xp(xp, dy), cache, input_grad=False)
    assert none is None
    assert_close(dw2, ew, xp)


def test_conv_transpose_central_differences_and_errors():
    rng = np.random.default_rng(21)
    x, w, b = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(2)
    y, cache = F.conv_transpose2d_forward(x, w, b)
    assert y.shape == (2, 2, 6, 8)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv_transpose2d_backward(dy, cache)
    loss = lambda x_, w_, b_: np.sum(F.conv_transpose2d_forward(x_, w_, b_)[0] * dy)  # noqa: E731
    assert rel_err(dx, central_difference(lambda v: loss(v, w, b), x.copy())) < 1e-6
    assert rel_err(dw, central_difference(lambda v: loss(x, v, b), w.copy())) < 1e-6
    assert rel_err(db, central_difference(lambda v: loss(x, w, v), b.copy())) < 1e-6
    with pytest.raises(ValueError, match=r"3 channels.*\(2, 2, 3, 3\)"):
        F.conv_transpose2d_forward(x, np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        F.conv_transpose2d_forward(x, w, np.zeros(3))
    with pytest.raises(ValueError, match="output_padding"):
        F.conv_transpose2d_forward(x, w, stride=2, output_padding=2)


@given(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), seeds, st.booleans())
def test_maxpool_matches_reference_ties_included(xp, shape, seed, ties):
    N, C, h, w = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, 2 * h, 2 * w))
    if ties:  # few distinct values: windows with two or more equal maxima
        x = np.round(x)
    y, cache = F.maxpool2x2_forward(to_xp(xp, x))
    assert_close(y, ref.maxpool2x2(x), xp, dtype="float64")
    dy = rng.standard_normal((N, C, h, w))
    assert_close(F.maxpool2x2_backward(to_xp(xp, dy), cache), ref.maxpool2x2_grad(dy, x), xp)


def test_maxpool_central_differences_and_errors():
    rng = np.random.default_rng(22)
    x = rng.permutation(96).reshape(2, 3, 4, 4) * 0.1  # distinct values: no ties, no kinks within 0.05
    _, cache = F.maxpool2x2_forward(x)
    dy = rng.standard_normal((2, 3, 2, 2))
    num = central_difference(lambda v: np.sum(F.maxpool2x2_forward(v)[0] * dy), x.copy())
    assert rel_err(F.maxpool2x2_backward(dy, cache), num) < 1e-8
    with pytest.raises(ValueError, match=r"even H and W, got \(1, 1, 3, 4\)"):
        F.maxpool2x2_forward(np.zeros((1, 1, 3, 4)))


def test_dropout2d_drops_whole_channels_and_matches_reference(xp):
    rng = np.random.default_rng(23)
    x = to_xp(xp, rng.standard_normal((4, 6, 3, 3)))
    mask = F.dropout2d_mask(np.random.default_rng(5), (4, 6), 0.25, xp, dtype="float64")
    keep = np.random.default_rng(5).random((4, 6)) >= 0.25  # the same draw on the host
    assert_close(mask, (keep / 0.75)[:, :, None, None], xp, dtype="float64")
    y, cache = F.dropout2d_forward(x, mask)
    assert_close(y, ref.dropout2d(to_np(x), keep, 0.25), xp)
    dy = rng.standard_normal(y.shape)
    assert_close(F.dropout2d_backward(to_xp(xp, dy), cache), ref.dropout2d(dy, keep, 0.25), xp)
    same, identity = F.dropout2d_forward(x, None)
    assert same is x and F.dropout2d_backward(same, identity) is same
    with pytest.raises(ValueError, match="dropout rate"):
        F.dropout2d_mask(np.random.default_rng(0), (1, 1), 1.0, xp)
    with pytest.raises(ValueError, match=r"mask must have shape \(4, 6, 1, 1\)"):
        F.dropout2d_forward(x, mask[:2, ...])
