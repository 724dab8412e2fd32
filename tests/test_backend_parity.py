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


def test_training_step_matches_numpy_float64(xp):
    ref_terms, ref_params, ref_g = run_step(backend.namespace("numpy"), "float64")
    terms, params, g = run_step(xp, "float64")
    for k in ref_terms:
        assert terms[k] == pytest.approx(ref_terms[k], rel=1e-10), k
    for k in ref_params:
        assert params[k].dtype == np.float64
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-10, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(g[k], ref_g[k], rtol=1e-9, atol=1e-12, err_msg=k)


def rel_norm(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_training_step_in_float32_is_as_accurate_as_numpy_float32(xp):
    """float32 against the float64 result: within 1e-4 for losses and parameters, 2e-3 (norm-wise)
    for gradients; NumPy's own float32 gradients land up to ~4e-4 from float64 here (BatchNorm
    backward cancels), so a tighter gradient bound would fail on any float32 implementation."""
    ref_terms, ref_params, ref_g = run_step(backend.namespace("numpy"), "float64")
    terms, params, g = run_step(xp, "float32")
    for k in ref_terms:
        assert terms[k] == pytest.approx(ref_terms[k], rel=1e-4, abs=1e-6), k
    for k in ref_params:
        assert params[k].dtype == np.float32
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=k)
        if k.endswith(".conv.bias"):  # exactly zero in exact arithmetic (BatchNorm follows)
            assert np.abs(g[k]).max() < 1e-6, k
        else:
            assert rel_norm(g[k], ref_g[k]) < 2e-3, k


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
