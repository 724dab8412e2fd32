"""hicd_core.jax: hicd_loss as a differentiable JAX loss (skips without jax)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jax.config.update("jax_enable_x64", True)

from jax.test_util import check_grads  # noqa: E402

from hicd_core.jax import hicd_loss  # noqa: E402


# --------------------------------------------------------------------------- an independent transcription of SPEC 2


def _windows(f, w):
    N, C, H, W = f.shape
    if w is None:
        return jnp.transpose(f.reshape(N, 1, C, H * W), (0, 1, 3, 2))
    b = jnp.transpose(f.reshape(N, C, H // w, w, W // w, w), (0, 2, 4, 3, 5, 1))
    return b.reshape(N, (H // w) * (W // w), w * w, C)


def _unit(x, eps):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _sc(f, w, eps):
    X = _unit(_windows(f, w), eps)
    return X @ jnp.swapaxes(X, -1, -2)


def _cc(f1, f2, w, eps):
    return _unit(_windows(f1, w), eps) @ jnp.swapaxes(_unit(_windows(f2, w), eps), -1, -2)


def _gc(f, eps):
    g = _unit(jnp.mean(f, axis=(2, 3)), eps)
    return g @ g.T


def _dist(rs, rt, kind, tau):
    if kind == "mse":
        return jnp.mean((rs - rt) ** 2)
    rows = rs.size // rs.shape[-1]
    p = jax.nn.softmax(rt / tau, -1)
    return tau * tau / rows * jnp.sum(p * (jax.nn.log_softmax(rt / tau, -1) - jax.nn.log_softmax(rs / tau, -1)))


def reference_loss(sem_s, sem_t, c_s, c_t, windows, cw, kind="kl", tau=0.5, eps=1e-6):
    total = 0.0
    for (s1, s2), (t1, t2), w in zip(sem_s, sem_t, windows):
        total += (_dist(_sc(s1, w, eps), _sc(t1, w, eps), kind, tau) + _dist(_sc(s2, w, eps), _sc(t2, w, eps), kind, tau)) / 2
        total += _dist(_cc(s1, s2, w, eps), _cc(t1, t2, w, eps), kind, tau)
        total += _dist(_gc(jnp.concatenate([s1, s2]), eps), _gc(jnp.concatenate([t1, t2]), eps), kind, tau)
    if c_s is not None:
        total += _dist(_sc(c_s, cw, eps), _sc(c_t, cw, eps), kind, tau) + _dist(_gc(c_s, eps), _gc(c_t, eps), kind, tau)
    return total


def features(seed, dtype=np.float64, N=2, size=8):
    rng = np.random.default_rng(seed)
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(dtype))  # noqa: E731
    sem_s = [(r(N, 3, size, size), r(N, 3, size, size))]
    sem_t = [(r(N, 5, size, size), r(N, 5, size, size))]
    return sem_s, sem_t, r(N, 3, size, size), r(N, 6, size, size)


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("window", [4, None])
def test_check_grads_reverse_mode(kind, window):
    sem_s, sem_t, c_s, c_t = features(0, size=4)
    window = None if window is None else 2
    f = lambda a, b, c: hicd_loss([(a, b)], sem_t, c, c_t, windows=[window], change_window=window,  # noqa: E731
                                  kind=kind, tau=0.7)
    check_grads(jax.jit(f), (sem_s[0][0], sem_s[0][1], c_s), order=1, modes=["rev"])


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_custom_vjp_matches_jax_grad_of_an_independent_transcription_and_jit_matches_eager(kind):
    sem_s, sem_t, c_s, c_t = features(1)
    ours = lambda a, b, c: hicd_loss([(a, b)], sem_t, c, c_t, windows=[4], change_window=4, kind=kind)  # noqa: E731
    theirs = lambda a, b, c: reference_loss([(a, b)], sem_t, c, c_t, [4], 4, kind=kind)  # noqa: E731
    args = (sem_s[0][0], sem_s[0][1], c_s)
    eager = ours(*args)
    assert eager.shape == () and eager.dtype == jnp.float64
    np.testing.assert_allclose(eager, jax.jit(theirs)(*args), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(ours)(*args), eager, rtol=1e-12)
    g_ours = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    g_theirs = jax.jit(jax.grad(theirs, argnums=(0, 1, 2)))(*args)
    for a, b in zip(g_ours, g_theirs):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-15)


def test_vmap_over_an_extra_axis_is_one_loss_per_slice():
    sem_s, sem_t, _, _ = features(2)
    stacked = jnp.stack([jnp.stack(sem_s[0]), 2.0 * jnp.stack(sem_s[0]) + 0.3])  # (2 slices, 2 phases, N, C, H, W)
    one = jax.jit(lambda s: hicd_loss([(s[0], s[1])], sem_t, windows=[4]))
    per_slice = jax.vmap(one)
    values = jax.jit(per_slice)(stacked)
    for k in range(2):
        np.testing.assert_allclose(values[k], one(stacked[k]), rtol=1e-12)
    g = jax.jit(jax.grad(lambda s: jnp.sum(per_slice(s))))(stacked)
    g0 = jax.jit(jax.grad(one))(stacked[0])
    np.testing.assert_allclose(g[0], g0, rtol=1e-9, atol=1e-15)


def test_dtype_policy_and_static_numpy_settings():
    sem_s, sem_t, c_s, c_t = features(3, dtype=np.float32)
    sem_t = [(a.astype(jnp.float64), b.astype(jnp.float64)) for a, b in sem_t]
    f = lambda a: hicd_loss([(a, sem_s[0][1])], sem_t, windows=[np.int64(4)], tau=np.float32(0.5))  # noqa: E731
    assert jax.jit(f)(sem_s[0][0]).dtype == jnp.float32
    assert jax.jit(jax.grad(f))(sem_s[0][0]).dtype == jnp.float32
    low = jax.jit(lambda a, b: hicd_loss([(a, b)], sem_t, windows=[4]))(
        sem_s[0][0].astype(jnp.bfloat16), sem_s[0][1].astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
