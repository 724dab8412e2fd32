"""``hicd_loss`` as a differentiable PyTorch loss (optional: needs ``torch``; ``pip install hicd[torch]``).

    from hicd_core.torch import hicd_loss

    loss = task_loss + hicd_loss([(s1, s2)], [(t1, t2)], c_s, c_t, windows=[8], change_window=8)
    loss.backward()                     # gradients reach the student's features and parameters

A ``torch.autograd.Function`` runs the core ``hicd_core.hicd_loss`` (SPEC section 2)
on the detached tensors and returns its hand-derived gradients, scaled by the
incoming gradient, in the backward pass: no autograd graph is built through the
correlations. The teacher is a constant: its tensors get no gradient.

* **Devices**: CPU and CUDA tensors (the core runs on them through array-api-compat).
* **Dtype policy**: the student's tensors share one dtype; the teacher's are cast to
  it. float32 and float64 are computed as they are; bfloat16 and float16 are
  computed in float32 (softmax and normalisation need the range) and the loss and
  gradients are cast back to the student's dtype.
* **Transforms**: works under ``torch.compile(fullgraph=True)`` and ``torch.func.grad``
  (the function is written in the ``setup_context`` form). The settings are plain
  Python values, fixed per call.
* **Non-finite values**: with ``check_finite="auto"`` (default) an eager call raises
  ``NonFiniteError`` naming the term; under ``torch.compile`` no host sync happens,
  and checking the loss is the training loop's job.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import distill

__all__ = ["hicd_loss"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Spec(NamedTuple):
    """Everything that is not a tensor: static per call."""

    n_stages: int
    has_chg: bool
    settings: distill.HiCDSettings


def _split(spec: _Spec, tensors):
    """Flat ``(student..., teacher...)`` -> the core's structures."""
    n = 2 * spec.n_stages + spec.has_chg
    student, teacher = tensors[:n], tensors[n:]
    sem_s = [(student[2 * i], student[2 * i + 1]) for i in range(spec.n_stages)]
    sem_t = [(teacher[2 * i], teacher[2 * i + 1]) for i in range(spec.n_stages)]
    chg_s = student[-1] if spec.has_chg else None
    chg_t = teacher[-1] if spec.has_chg else None
    return sem_s, sem_t, chg_s, chg_t


class _HiCDLoss(torch.autograd.Function):
    @staticmethod
    def forward(spec, *tensors):
        sem_s, sem_t, chg_s, chg_t = _split(spec, tensors)
        out_dtype = (sem_s[0][0] if sem_s else chg_s).dtype
        if out_dtype in _LOW_PRECISION:
            up = lambda a: None if a is None else a.to(torch.float32)  # noqa: E731
            sem_s = [(up(a), up(b)) for a, b in sem_s]
            sem_t = [(up(a), up(b)) for a, b in sem_t]
            chg_s, chg_t = up(chg_s), up(chg_t)
        loss, grads = distill.hicd_loss(sem_s, sem_t, chg_s, chg_t, **spec.settings._asdict())
        flat = [g for pair in grads["sem"] for g in pair] + ([grads["chg"]] if spec.has_chg else [])
        return (loss.to(out_dtype), *(g.to(out_dtype) for g in flat))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec = inputs[0]
        ctx.n_teacher = 2 * spec.n_stages + spec.has_chg
        grads = output[1:]
        ctx.mark_non_differentiable(*grads)
        ctx.save_for_backward(*grads)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        student = tuple(g * grad_loss for g in ctx.saved_tensors)
        return (None, *student, *([None] * ctx.n_teacher))


def hicd_loss(student_sem, teacher_sem, student_chg=None, teacher_chg=None, *, windows, change_window=None,
              w_self=1.0, w_cross=1.0, w_global=1.0, kind="kl", tau=0.5, eps=1e-6, check_finite="auto"):
    """The HiCD loss of ``hicd_core.hicd_loss`` as a 0-d tensor, differentiable w.r.t. the student.

    Parameters
    ----------
    student_sem, teacher_sem : sequences of ``(f1, f2)`` tensor pairs, one per semantic stage,
        each (N, C_l, H_l, W_l); the teacher's channel counts may differ.
    student_chg, teacher_chg : tensors (N, C, H, W) or None
    windows, change_window, w_self, w_cross, w_global, kind, tau, eps, check_finite :
        as in ``hicd_core.hicd_loss`` (plain numbers; NumPy scalars are accepted).

    Returns
    -------
    loss : 0-d tensor in the student's dtype, on the student's device. Its gradient
        flows into every student tensor that requires grad; the teacher's get none.
    """
    student_sem, teacher_sem, settings = distill.checked_arguments(
        student_sem, teacher_sem, student_chg, teacher_chg, windows=windows, change_window=change_window,
        w_self=w_self, w_cross=w_cross, w_global=w_global, kind=kind, tau=tau, eps=eps, check_finite=check_finite)
    spec = _Spec(len(student_sem), student_chg is not None, settings)
    student = [f for pair in student_sem for f in pair] + ([student_chg] if student_chg is not None else [])
    teacher = [f for pair in teacher_sem for f in pair] + ([teacher_chg] if teacher_chg is not None else [])
    for t in student + teacher:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"hicd_core.torch.hicd_loss takes torch tensors, got "
                            f"{type(t).__module__}.{type(t).__qualname__}")
    teacher = [t.detach() for t in teacher]
    return _HiCDLoss.apply(spec, *student, *teacher)[0]
