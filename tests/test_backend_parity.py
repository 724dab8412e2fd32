"""Whole training steps and errors agree across backends (numpy, array-api-strict, CuPy on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from hicd_core import backend, hicd_loss, io
from hicd_core.model import TinySiamCD
from hicd_core.optim import SGD, AdamW
from hicd_core.train import DistillConfig, train_step
from tests.conftest import to_np, to_xp

WIDTHS = (4, 8, 8, 16)


def run_step(xp, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x1, x2, x2_hq = rng.random((3, 2, 3, 16, 16))
    label = (rng.random((2, 16, 16)) > 0.7).astype(np.uint8)
    student = TinySiamCD(WIDTHS, xp=xp, dtype=dtype, seed=0)
    teacher = TinySiamCD(WIDTHS, xp=xp, dtype=dtype, seed=1)
    # SGD, not Adam: Adam's first step is lr * sign(g), which turns the rounding noise of
    # exactly-zero gradients (conv biases followed by BatchNorm) into +-lr differences.
    opt = SGD(student.params, lr=1e-2)
    cfg = DistillConfig(method="hicd", windows=(None, None, None), change_window=8)
    conv = lambda a: to_xp(xp, a, dtype=dtype)  # noqa: E731
    terms = train_step(student, opt, conv(x1), conv(x2), to_xp(xp, label), teacher=teacher,
                       teacher_x2=conv(x2_hq), distill=cfg)
    return {k: float(v) for k, v in terms.items()}, {k: to_np(v) for k, v in student.params.items()}, \
        {k: to_np(v) for k, v in opt.state["momentum_buffer"].items()}


@pytest.mark.parametrize("dtype, rtol, atol", [("float64", 1e-9, 1e-12), ("float32", 1e-4, 1e-5)])
def test_training_step_matches_numpy(xp, dtype, rtol, atol):
    ref_terms, ref_params, ref_m = run_step(backend.namespace("numpy"), dtype)
    terms, params, m = run_step(xp, dtype)
    for k in ref_terms:
        assert terms[k] == pytest.approx(ref_terms[k], rel=rtol, abs=atol), k
    for k in ref_params:
        assert params[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(params[k], ref_params[k], rtol=rtol, atol=atol, err_msg=k)
        np.testing.assert_allclose(m[k], ref_m[k], rtol=rtol, atol=atol, err_msg=k)


def test_bad_input_raises_the_same_error(xp):
    messages = []
    for ns in (backend.namespace("numpy"), xp):
        a = to_xp(ns, np.ones((2, 3, 4, 4)))
        with pytest.raises(ValueError) as exc:
            hicd_loss([(a, a)], [(a, a)], windows=[3])
        messages.append(str(exc.value))
        model = TinySiamCD(WIDTHS, xp=ns)
        with pytest.raises(ValueError) as exc:
            model.forward(to_xp(ns, np.ones((1, 3, 12, 8))), to_xp(ns, np.ones((1, 3, 12, 8))))
        messages.append(str(exc.value))
    assert messages[:2] == messages[2:]


def test_checkpoint_moves_between_backends(xp, tmp_path):
    model = TinySiamCD(WIDTHS, xp=xp, seed=3)
    opt = AdamW(model.params)
    io.save_checkpoint(tmp_path / "c.h5", model=model, optimizer=opt, step=1)
    ck = io.load_checkpoint(tmp_path / "c.h5")
    on_cpu = TinySiamCD(WIDTHS, seed=9)  # NumPy
    on_cpu.load_state_dict(ck)
    back = TinySiamCD(WIDTHS, xp=xp, seed=9)
    back.load_state_dict(on_cpu.state_dict())
    for k in model.params:
        assert np.array_equal(to_np(model.params[k]), on_cpu.params[k])
        assert np.array_equal(to_np(back.params[k]), on_cpu.params[k])
        assert backend.array_namespace(back.params[k]).__name__ == xp.__name__
