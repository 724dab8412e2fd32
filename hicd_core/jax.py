"""``hicd_loss`` as a differentiable JAX loss (optional: needs ``jax``; ``pip install hicd[jax]``).

    from hicd_core.jax import hicd_loss

    def loss_fn(params, batch):
        ...
        return task + hicd_loss([(s1, s2)], [(t1, t2)], c_s, c_t, windows=(8,), change_window=8)

    grads = jax.jit(jax.grad(loss_fn))(params, batch)

A ``jax.custom_vjp`` function whose forward pass runs the core
``hicd_core.hicd_loss`` (SPEC section 2) on the arrays (traced by JAX like any
``jax.numpy`` code) and keeps its hand-derived gradients as residuals; the
backward pass scales them by the incoming cotangent. No JAX autodiff runs through
the correlations. The teacher is a constant: its cotangent is zero.

* **Static settings**: ``windows``, ``change_window``, the weights, ``kind``, ``tau``,
  ``eps`` are Python values fixed when the function is traced (a new value traces a
  new function; a cache keeps them). Only the feature arrays may be traced.
* **Transforms**: eager calls, ``jit``, ``grad`` / ``vjp`` (reverse mode; forward-mode
  ``jvp`` is not defined for a ``custom_vjp``), and ``vmap`` over an extra leading axis
  of every feature (each slice is its own batch: its own global correlations).
* **Dtype policy**: as in ``hicd_core.torch``: the teacher is cast to the student's
  dtype; bfloat16 / float16 are computed in float32 and cast back. float64 needs
  ``jax.config.update("jax_enable_x64", True)``, as everywhere in JAX.
* **Non-finite values**: under a transform nothing is read on the host; an eager call
  with ``check_finite="auto"`` raises ``NonFiniteError`` as the core does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import distill

__all__ = ["hicd_loss"]

_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def _core(settings, student, teacher):
    """``(loss, (sem grads, chg grad))`` of the core on the student/teacher pytrees."""
    sem_s, chg_s = student
    sem_t, chg_t = teacher
    out_dtype = (sem_s[0][0] if sem_s else chg_s).dtype
    if out_dtype in _LOW_PRECISION:
        up = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
        sem_s = tuple((up(a), up(b)) for a, b in sem_s)
        sem_t = tuple((up(a), up(b)) for a, b in sem_t)
        chg_s, chg_t = up(chg_s), up(chg_t)
    loss, grads = distill.hicd_loss(list(sem_s), list(sem_t), chg_s, chg_t, **settings._asdict())
    sem_g = tuple((g1.astype(out_dtype), g2.astype(out_dtype)) for g1, g2 in grads["sem"])
    chg_g = None if grads["chg"] is None else grads["chg"].astype(out_dtype)
    return loss.astype(out_dtype), (sem_g, chg_g)


@functools.lru_cache(maxsize=128)
def _loss_function(settings):
    """The ``custom_vjp`` loss for one set of static settings."""

    @jax.custom_vjp
    def loss(student, teacher):
        return _core(settings, student, teacher)[0]

    def forward(student, teacher):
        value, grads = _core(settings, student, teacher)
        return value, (grads, teacher)

    def backward(residuals, cotangent):
        grads, teacher = residuals
        student_bar = jax.tree_util.tree_map(lambda g: g * cotangent, grads)
        return student_bar, jax.tree_util.tree_map(jnp.zeros_like, teacher)

    loss.defvjp(forward, backward)
    return loss


def hicd_loss(student_sem, teacher_sem, student_chg=None, teacher_chg=None, *, windows, change_window=None,
              w_self=1.0, w_cross=1.0, w_global=1.0, kind="kl", tau=0.5, eps=1e-6, check_finite="auto"):
    """The HiCD loss of ``hicd_core.hicd_loss`` as a 0-d ``jax.Array``, differentiable w.r.t. the student.

    Parameters
    ----------
    student_sem, teacher_sem : sequences of ``(f1, f2)`` array pairs, one per semantic stage,
        each (N, C_l, H_l, W_l); the teacher's channel counts may differ.
    student_chg, teacher_chg : arrays (N, C, H, W) or None
    windows, change_window, w_self, w_cross, w_global, kind, tau, eps, check_finite :
        as in ``hicd_core.hicd_loss``; static (Python or NumPy numbers, never traced).

    Returns
    -------
    loss : 0-d array in the student's dtype.
    """
    sem_s, sem_t, settings = distill.checked_arguments(
        student_sem, teacher_sem, student_chg, teacher_chg, windows=windows, change_window=change_window,
        w_self=w_self, w_cross=w_cross, w_global=w_global, kind=kind, tau=tau, eps=eps, check_finite=check_finite)
    as_array = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    student = (tuple((as_array(a), as_array(b)) for a, b in sem_s), as_array(student_chg))
    teacher = (tuple((as_array(a), as_array(b)) for a, b in sem_t), as_array(teacher_chg))
    return _loss_function(settings)(student, teacher)
