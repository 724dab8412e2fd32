"""correlation_distance and hicd_loss: parity with reference/, gradient checks, properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference.correlation as ref
from hicd_core import NonFiniteError, correlation_distance, feature_mse_loss, hicd_loss
from tests.conftest import assert_close, to_np, to_xp
from tests.test_correlation import central_difference, seeds

kinds = st.sampled_from(["kl", "mse"])
taus = st.floats(0.1, 2.0)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), kinds, taus, seeds)
def test_distance_matches_reference(xp, shape, kind, tau, seed):
    rng = np.random.default_rng(seed)
    r_s, r_t = np.tanh(rng.standard_normal(shape)), np.tanh(rng.standard_normal(shape))
    loss, grad = correlation_distance(to_xp(xp, r_s), to_xp(xp, r_t), kind, tau)
    assert_close(loss, ref.distance(r_s, r_t, kind, tau), xp, dtype="float64")
    assert_close(grad, ref.distance_grad(r_s, r_t, kind, tau), xp, dtype="float64")


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), kinds, taus, seeds)
def test_distance_is_zero_at_teacher_and_nonnegative(shape, kind, tau, seed):
    rng = np.random.default_rng(seed)
    r_t = np.tanh(rng.standard_normal(shape))
    loss, grad = correlation_distance(r_t.copy(), r_t, kind, tau)
    assert float(loss) == pytest.approx(0.0, abs=1e-15)
    assert np.abs(grad).max() <= 1e-15
    r_s = np.tanh(rng.standard_normal(shape))
    assert float(correlation_distance(r_s, r_t, kind, tau)[0]) >= -1e-15


@pytest.mark.parametrize("dtype, tau", [("float64", 0.5), ("float32", 0.5), ("float32", 0.02), ("float64", 0.004)])
def test_unshifted_softmax_matches_row_maxima(xp, dtype, tau):
    """For |r| <= 1 (hicd_loss's correlations) the softmax may skip its row-maximum shift."""
    from hicd_core import distill

    rng = np.random.default_rng(4)
    r_s, r_t = (np.tanh(rng.standard_normal((3, 7, 16))).astype(dtype) for _ in range(2))
    assert not distill._shift_needed(1.0, tau, getattr(xp, dtype), 16, xp=xp)
    ref_loss, ref_grad = correlation_distance(to_xp(xp, r_s), to_xp(xp, r_t), "kl", tau)
    loss, grad = correlation_distance(to_xp(xp, r_s), to_xp(xp, r_t), "kl", tau, bound=1.0)
    tol = 1e-11 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    np.testing.assert_allclose(to_np(grad), to_np(ref_grad), rtol=tol, atol=tol * float(np.abs(to_np(ref_grad)).max()))


def test_softmax_shift_kept_where_exp_could_overflow_or_underflow():
    from hicd_core import distill

    xp = distill.array_namespace(np.zeros(1))
    assert distill._shift_needed(None, 0.5, xp.float32, 64, xp=xp)  # unknown bound
    assert not distill._shift_needed(1.0, 0.5, xp.float32, 64, xp=xp)  # |z| <= 2
    assert distill._shift_needed(1.0, 0.01, xp.float32, 64, xp=xp)  # |z| <= 100: exp(-100) underflows in float32
    assert not distill._shift_needed(1.0, 0.01, xp.float64, 64, xp=xp)
    assert distill._shift_needed(1.0, 0.5, xp.float32, 10**40, xp=xp)  # row sums could overflow
    # and the shifted path is still exact where it is needed
    r = np.tanh(np.random.default_rng(5).standard_normal((2, 8))).astype(np.float32)
    loss, grad = correlation_distance(r, r[::-1].copy(), "kl", 0.01, bound=1.0)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_distance_gradient_matches_central_differences(kind):
    rng = np.random.default_rng(3)
    r_s, r_t = np.tanh(rng.standard_normal((2, 3, 5))), np.tanh(rng.standard_normal((2, 3, 5)))
    _, grad = correlation_distance(r_s, r_t, kind, 0.7)
    num = central_difference(lambda x: float(correlation_distance(x, r_t, kind, 0.7)[0]), r_s.copy())
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_distance_over_blocks_of_rows_adds_up_to_the_whole(kind):
    rng = np.random.default_rng(4)
    r_s, r_t = np.tanh(rng.standard_normal((7, 5, 6))), np.tanh(rng.standard_normal((7, 5, 6)))
    loss, grad = correlation_distance(r_s, r_t, kind, 0.7)
    parts = [correlation_distance(r_s[b], r_t[b], kind, 0.7, rows=35) for b in (slice(0, 3), slice(3, 7))]
    assert float(parts[0][0] + parts[1][0]) == pytest.approx(float(loss), rel=1e-13)
    np.testing.assert_allclose(np.concatenate([g for _, g in parts]), grad, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="rows=10 is fewer than the 35 rows"):
        correlation_distance(r_s, r_t, kind, rows=10)


@pytest.mark.parametrize("block_elements", [1, 3 * 16, 10**6])  # one window, ragged blocks of 3, all at once
def test_hicd_loss_over_blocks_of_windows_matches_reference(monkeypatch, block_elements):
    from hicd_core import distill

    monkeypatch.setattr(distill, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(8)
    s_sem = [(rng.standard_normal((2, 3, 8, 4)), rng.standard_normal((2, 3, 8, 4)))]  # 8 windows of 2x2 per image
    t_sem = [(rng.standard_normal((2, 5, 8, 4)), rng.standard_normal((2, 5, 8, 4)))]
    s_chg, t_chg = rng.standard_normal((2, 2, 4, 6)), rng.standard_normal((2, 4, 4, 6))
    kw = dict(windows=[2], change_window=2, w_self=0.5, w_cross=1.0, w_global=1.0)
    loss, grads = hicd_loss(s_sem, t_sem, s_chg, t_chg, **kw)
    ref_loss, ref_grads = ref.hicd_loss(s_sem, t_sem, s_chg, t_chg, **kw)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    for g, e in zip([*grads["sem"][0], grads["chg"]], [*ref_grads["sem"][0], ref_grads["chg"]]):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-14)


@st.composite
def hicd_problems(draw):
    """Random stages (shapes, windows, teacher channel counts) and loss settings."""
    n = draw(st.integers(1, 2))
    stages = []
    for _ in range(draw(st.integers(1, 2))):
        window = draw(st.sampled_from([None, 1, 2]))
        side = draw(st.integers(1, 3)) * (window or 1)
        stages.append(((n, draw(st.integers(1, 3)), side, side), draw(st.integers(1, 3)), window))
    change = draw(st.booleans())
    cw = draw(st.sampled_from([None, 2]))
    weights = [draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(3)]
    return stages, change, cw, weights, draw(kinds), draw(taus), draw(seeds)


def build(problem):
    stages, change, cw, weights, kind, tau, seed = problem
    rng = np.random.default_rng(seed)
    s_sem, t_sem, windows = [], [], []
    for shape, c_t, window in stages:
        t_shape = (shape[0], c_t) + shape[2:]
        s_sem.append((rng.standard_normal(shape), rng.standard_normal(shape)))
        t_sem.append((rng.standard_normal(t_shape), rng.standard_normal(t_shape)))
        windows.append(window)
    n = stages[0][0][0]
    s_chg = t_chg = None
    if change:
        s_chg, t_chg = rng.standard_normal((n, 2, 4, 4)), rng.standard_normal((n, 3, 4, 4))
    kw = dict(windows=windows, change_window=cw, w_self=weights[0], w_cross=weights[1], w_global=weights[2],
              kind=kind, tau=tau)
    return s_sem, t_sem, s_chg, t_chg, kw


@given(hicd_problems())
def test_hicd_loss_matches_reference(xp, problem):
    s_sem, t_sem, s_chg, t_chg, kw = build(problem)
    conv = lambda a: None if a is None else to_xp(xp, a)  # noqa: E731
    loss, grads = hicd_loss(
        [(conv(a), conv(b)) for a, b in s_sem], [(conv(a), conv(b)) for a, b in t_sem], conv(s_chg), conv(t_chg), **kw
    )
    ref_loss, ref_grads = ref.hicd_loss(s_sem, t_sem, s_chg, t_chg, **kw)
    assert_close(loss, ref_loss, xp, dtype="float64")
    for (g1, g2), (e1, e2) in zip(grads["sem"], ref_grads["sem"]):
        assert_close(g1, e1, xp, dtype="float64")
        assert_close(g2, e2, xp, dtype="float64")
    if s_chg is None:
        assert grads["chg"] is None
    else:
        assert_close(grads["chg"], ref_grads["chg"], xp, dtype="float64")
    expected_terms = sum(1 for w in (kw["w_self"], kw["w_cross"], kw["w_global"]) if w) * len(s_sem)
    if s_chg is not None:
        expected_terms += sum(1 for w in (kw["w_self"], kw["w_global"]) if w)
    assert len(grads["terms"]) == expected_terms


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_hicd_loss_gradient_matches_central_differences(kind):
    rng = np.random.default_rng(11)
    s_sem = [(rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))),
             (rng.standard_normal((2, 4, 2, 2)), rng.standard_normal((2, 4, 2, 2)))]
    t_sem = [(rng.standard_normal((2, 5, 4, 4)), rng.standard_normal((2, 5, 4, 4))),
             (rng.standard_normal((2, 2, 2, 2)), rng.standard_normal((2, 2, 2, 2)))]
    s_chg, t_chg = rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 2, 4, 4))
    kw = dict(windows=[2, None], change_window=2, w_self=0.7, w_cross=1.3, w_global=0.9, kind=kind, tau=0.5)
    _, grads = hicd_loss(s_sem, t_sem, s_chg, t_chg, **kw)

    def loss_with(replace):
        sem = [list(p) for p in s_sem]
        chg = s_chg
        for (where, x) in replace:
            if where == "chg":
                chg = x
            else:
                sem[where[0]][where[1]] = x
        return float(hicd_loss([tuple(p) for p in sem], t_sem, chg, t_chg, **kw)[0])

    for l in range(2):
        for phase in range(2):
            num = central_difference(lambda x: loss_with([((l, phase), x)]), s_sem[l][phase].copy())
            np.testing.assert_allclose(grads["sem"][l][phase], num, rtol=1e-6, atol=1e-9)
    num = central_difference(lambda x: loss_with([("chg", x)]), s_chg.copy())
    np.testing.assert_allclose(grads["chg"], num, rtol=1e-6, atol=1e-9)


def test_hicd_loss_directional_check_at_training_sizes():
    """One directional derivative at the default tap shapes (small batch), float64."""
    rng = np.random.default_rng(5)
    shapes = [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    s_sem = [(rng.standard_normal(s), rng.standard_normal(s)) for s in shapes]
    t_sem = [(rng.standard_normal(s), rng.standard_normal(s)) for s in shapes]
    s_chg, t_chg = rng.standard_normal((2, 16, 64, 64)), rng.standard_normal((2, 16, 64, 64))
    kw = dict(windows=[8, 8, None], change_window=8)
    _, grads = hicd_loss(s_sem, t_sem, s_chg, t_chg, **kw)
    v_sem = [(rng.standard_normal(s), rng.standard_normal(s)) for s in shapes]
    v_chg = rng.standard_normal(s_chg.shape)
    analytic = sum(np.sum(g1 * v1) + np.sum(g2 * v2) for (g1, g2), (v1, v2) in zip(grads["sem"], v_sem))
    analytic += np.sum(grads["chg"] * v_chg)
    h = 1e-5

    def at(t):
        sem = [(a + t * va, b + t * vb) for (a, b), (va, vb) in zip(s_sem, v_sem)]
        return float(hicd_loss(sem, t_sem, s_chg + t * v_chg, t_chg, **kw)[0])

    numeric = (at(h) - at(-h)) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_student_equal_to_teacher_gives_zero_loss_and_gradient(xp):
    rng = np.random.default_rng(0)
    f1, f2, c = (to_xp(xp, rng.standard_normal(s)) for s in [(2, 3, 4, 4), (2, 3, 4, 4), (2, 2, 4, 4)])
    loss, grads = hicd_loss([(f1, f2)], [(f1, f2)], c, c, windows=[2], change_window=2)
    assert abs(float(loss)) < 1e-14
    for g in [*grads["sem"][0], grads["chg"]]:
        assert np.abs(to_np(g)).max() < 1e-14


def test_zero_weights_skip_terms_and_give_zero_gradients():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 3, 4, 4))
    loss, grads = hicd_loss([(f, f + 1)], [(f, f)], windows=[2], w_self=0.0, w_cross=0.0, w_global=0.0)
    assert float(loss) == 0.0 and grads["terms"] == {}
    assert not np.any(grads["sem"][0][0]) and grads["chg"] is None
    _, grads = hicd_loss([(f, f + 1)], [(f, f)], windows=[2], w_cross=0.0)
    assert set(grads["terms"]) == {"sem0.self", "sem0.global"}


def test_errors_name_the_shapes():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 4))
    with pytest.raises(ValueError, match="windows has 2 entries for 1"):
        hicd_loss([(a, a)], [(a, a)], windows=[2, 2])
    with pytest.raises(ValueError, match="student_sem has 1 stages but teacher_sem has 2"):
        hicd_loss([(a, a)], [(a, a), (a, a)], windows=[2])
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 4, 4\).*\(2, 3, 4, 2\)"):
        hicd_loss([(a, a[..., :2])], [(a, a)], windows=[2])
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(1, 3, 4, 4\).*N, H and W"):
        hicd_loss([(a, a)], [(a[:1], a[:1])], windows=[2])
    with pytest.raises(ValueError, match=r"window 3 does not divide.*\(2, 3, 4, 4\)"):
        hicd_loss([(a, a)], [(a, a)], windows=[3])
    with pytest.raises(ValueError, match="change features"):
        hicd_loss([(a, a)], [(a, a)], a, a[:, :, :2], windows=[2])
    with pytest.raises(ValueError, match="together"):
        hicd_loss([(a, a)], [(a, a)], a, None, windows=[2])
    with pytest.raises(ValueError, match="unknown distance kind"):
        hicd_loss([(a, a)], [(a, a)], windows=[2], kind="l1")
    with pytest.raises(ValueError, match="tau"):
        correlation_distance(a, a, tau=0.0)
    with pytest.raises(ValueError, match="w_cross"):
        hicd_loss([(a, a)], [(a, a)], windows=[2], w_cross=-1.0)


def test_non_finite_loss_names_the_term():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 4))
    bad = a.copy()
    bad[0, 0, 0, 0] = np.nan
    with np.errstate(invalid="ignore"):
        with pytest.raises(NonFiniteError, match="sem0.self"):
            hicd_loss([(a, a)], [(bad, a)], windows=[2], w_cross=0.0, w_global=0.0)
        with pytest.raises(NonFiniteError, match="chg.global"):
            hicd_loss([(a, a)], [(a, a)], a, bad, windows=[2], w_self=0.0, w_cross=0.0)


def test_feature_mse_loss():
    rng = np.random.default_rng(0)
    s = [rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 5, 2, 2))]
    t = [rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 5, 2, 2))]
    loss, grads = feature_mse_loss(s, t)
    assert float(loss) == pytest.approx(sum(np.mean((a - b) ** 2) for a, b in zip(s, t)), rel=1e-12)
    num = central_difference(lambda x: float(feature_mse_loss([x, s[1]], t)[0]), s[0].copy())
    np.testing.assert_allclose(grads[0], num, rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="student shape"):
        feature_mse_loss([s[0]], [t[1]])


def _small_pairs(seed, dtype_s="float32", dtype_t="float64"):
    rng = np.random.default_rng(seed)
    s = [rng.standard_normal((2, 3, 8, 8)).astype(dtype_s) for _ in range(2)]
    t = [rng.standard_normal((2, 5, 8, 8)).astype(dtype_t) for _ in range(2)]
    c = rng.standard_normal((2, 4, 8, 8)).astype(dtype_s), rng.standard_normal((2, 2, 8, 8)).astype(dtype_t)
    return s, t, c


def test_mixed_dtypes_follow_the_student_on_every_backend(xp):
    s, t, (c_s, c_t) = _small_pairs(0)
    loss, grads = hicd_loss([(to_xp(xp, s[0]), to_xp(xp, s[1]))], [(to_xp(xp, t[0]), to_xp(xp, t[1]))],
                            to_xp(xp, c_s), to_xp(xp, c_t), windows=[4], change_window=4)
    assert loss.dtype == xp.float32 and grads["sem"][0][0].dtype == xp.float32 and grads["chg"].dtype == xp.float32
    same, _ = hicd_loss([(s[0], s[1])], [(t[0].astype(np.float32), t[1].astype(np.float32))], c_s,
                        c_t.astype(np.float32), windows=[4], change_window=4)
    assert float(to_np(loss)) == pytest.approx(float(same), rel=1e-5)
    with pytest.raises(ValueError, match="share one dtype"):
        hicd_loss([(s[0], s[1].astype(np.float64))], [(t[0], t[1])], windows=[4])


def test_numpy_scalar_settings_are_accepted_and_bad_ones_named():
    s, t, _ = _small_pairs(1, "float64")
    plain, _ = hicd_loss([(s[0], s[1])], [(t[0], t[1])], windows=[4], tau=0.5, w_self=1.0)
    scalars, _ = hicd_loss([(s[0], s[1])], [(t[0], t[1])], windows=[np.int64(4)], tau=np.float32(0.5),
                           w_self=np.float64(1.0), w_cross=np.int32(1))
    assert float(scalars) == pytest.approx(float(plain), rel=1e-7)  # tau 0.5 is exact in float32
    for kw, name in ((dict(windows=[4.5]), "windows"), (dict(windows=[4], tau=-1), "tau"),
                     (dict(windows=[4], w_global=float("nan")), "w_global"), (dict(windows=[True]), "windows")):
        with pytest.raises(ValueError, match=name):
            hicd_loss([(s[0], s[1])], [(t[0], t[1])], **kw)


class _DLPackOnly:
    """An object that speaks only DLPack (as a foreign library's array might)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_only_inputs_are_converted_into_the_others_namespace():
    s, t, _ = _small_pairs(2, "float64")
    want, g_want = hicd_loss([(s[0], s[1])], [(t[0], t[1])], windows=[4])
    got, g_got = hicd_loss([(s[0], s[1])], [(_DLPackOnly(t[0]), _DLPackOnly(t[1]))], windows=[4])
    assert float(got) == float(want) and np.array_equal(g_got["sem"][0][0], g_want["sem"][0][0])
    alone, _ = hicd_loss([(_DLPackOnly(s[0]), _DLPackOnly(s[1]))], [(_DLPackOnly(t[0]), _DLPackOnly(t[1]))],
                         windows=[4])
    assert float(alone) == float(want)
    with pytest.raises(TypeError, match="expected an array"):
        hicd_loss([(s[0], s[1])], [([1.0], t[1])], windows=[4])


def test_the_loss_never_writes_its_inputs(xp):
    s, t, (c_s, c_t) = _small_pairs(3, "float64")
    arrays = [to_xp(xp, a) for a in (*s, *t, c_s, c_t)]
    before = [to_np(a).copy() for a in arrays]
    hicd_loss([(arrays[0], arrays[1])], [(arrays[2], arrays[3])], arrays[4], arrays[5], windows=[4],
              change_window=None)
    assert all(np.array_equal(to_np(a), b) for a, b in zip(arrays, before))


def test_an_empty_batch_is_a_clear_error():
    empty = np.zeros((0, 3, 8, 8))
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 3, 8, 8\)\)"):
        hicd_loss([(empty, empty)], [(empty, empty)], windows=[4])


def test_features_whose_squared_norm_overflows_raise_instead_of_a_wrong_finite_loss():
    s, t, _ = _small_pairs(4, "float32", "float32")
    huge = [a * np.float32(1e19) for a in s]  # |f|^2 overflows float32; the correlations would not change
    with pytest.raises(NonFiniteError, match="sem0"), np.errstate(over="ignore", invalid="ignore"):
        hicd_loss([(huge[0], huge[1])], [(t[0], t[1])], windows=[4])  # NumPy warns of the overflow, then this
    big = [a * np.float32(1e15) for a in s]  # still representable: the same loss as unscaled features
    want, _ = hicd_loss([(s[0], s[1])], [(t[0], t[1])], windows=[4])
    got, _ = hicd_loss([(big[0], big[1])], [(t[0], t[1])], windows=[4])
    assert float(got) == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
def test_hicd_loss_on_host_threads_gives_the_serial_values_bit_for_bit(xp, threads):
    pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(11)
    draw = lambda *shape: to_xp(xp, rng.standard_normal(shape), dtype="float32")  # noqa: E731
    s_sem = [(draw(2, 4, 8, 8), draw(2, 4, 8, 8)), (draw(2, 6, 4, 4), draw(2, 6, 4, 4))]
    t_sem = [(draw(2, 5, 8, 8), draw(2, 5, 8, 8)), (draw(2, 3, 4, 4), draw(2, 3, 4, 4))]
    c_s, c_t = draw(2, 3, 8, 8), draw(2, 2, 8, 8)
    kw = dict(windows=[4, None], change_window=2)
    serial, g_serial = hicd_loss(s_sem, t_sem, c_s, c_t, **kw)
    threaded, g_threaded = hicd_loss(s_sem, t_sem, c_s, c_t, threads=threads, **kw)
    assert float(threaded) == float(serial)
    got = [*(a for pair in g_threaded["sem"] for a in pair), g_threaded["chg"]]
    want = [*(a for pair in g_serial["sem"] for a in pair), g_serial["chg"]]
    assert all(np.array_equal(to_np(a), to_np(b)) for a, b in zip(got, want))
    assert {k: float(v) for k, v in g_threaded["terms"].items()} == {k: float(v) for k, v in g_serial["terms"].items()}


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2", None])
def test_a_bad_thread_count_is_named(threads):
    s, t, _ = _small_pairs(1, "float64")
    with pytest.raises(ValueError, match=f"threads must be a positive int, got {threads!r}"):
        hicd_loss([(s[0], s[1])], [(t[0], t[1])], windows=[4], threads=threads)
