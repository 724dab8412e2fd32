"""Optimizers against hand-computed updates; schedules; weight-decay filter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hicd_core.optim import SGD, AdamW, cosine_with_warmup, make_schedule, no_decay, poly


def test_no_decay_filter():
    assert no_decay("enc1.0.conv.bias") and no_decay("enc1.0.bn.weight") and no_decay("head.bias")
    assert not no_decay("enc1.0.conv.weight") and not no_decay("head.weight")


def test_adamw_two_steps_by_hand():
    p = {"w.weight": np.array([1.0, -2.0]), "w.bias": np.array([0.5])}
    g1 = {"w.weight": np.array([0.1, 0.2]), "w.bias": np.array([-0.3])}
    g2 = {"w.weight": np.array([-0.4, 0.0]), "w.bias": np.array([0.2])}
    opt = AdamW(p, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    held = p["w.weight"]
    opt.step(p, g1)
    opt.step(p, g2)
    assert np.array_equal(held, [1.0, -2.0])  # arrays the caller holds are not modified

    def by_hand(x, gs, decay):
        m = v = 0.0
        for t, g in enumerate(gs, start=1):
            if decay:
                x = x * (1 - 0.1 * 0.5)
            m = 0.9 * m + 0.1 * g
            v = 0.99 * v + 0.01 * g * g
            x = x - 0.1 * (m / (1 - 0.9**t)) / (math.sqrt(v / (1 - 0.99**t)) + 1e-8)
        return x

    for i, x0 in enumerate([1.0, -2.0]):
        assert p["w.weight"][i] == pytest.approx(by_hand(x0, [g1["w.weight"][i], g2["w.weight"][i]], True), rel=1e-12)
    assert p["w.bias"][0] == pytest.approx(by_hand(0.5, [-0.3, 0.2], False), rel=1e-12)
    assert opt.step_count == 2


def test_sgd_momentum_by_hand():
    p = {"w.weight": np.array([1.0])}
    opt = SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step(p, {"w.weight": np.array([0.5])})  # g = 0.5 + 0.1*1 = 0.6, buf = 0.6, p = 0.94
    assert p["w.weight"][0] == pytest.approx(0.94)
    opt.step(p, {"w.weight": np.array([0.5])})  # g = 0.5 + 0.094, buf = 0.54 + 0.594 = 1.134, p = 0.8266
    assert p["w.weight"][0] == pytest.approx(0.94 - 0.1 * 1.134)


def test_optimizer_errors():
    p = {"a": np.zeros(2)}
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=0.0)
    with pytest.raises(ValueError, match=r"no gradient for parameters \['a'\]"):
        AdamW(p).step(p, {})
    with pytest.raises(ValueError, match=r"gradient of a has shape \(3,\)"):
        AdamW(p).step(p, {"a": np.zeros(3)})


def test_schedules():
    assert cosine_with_warmup(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 1.0, warmup_steps=10, min_lr=0.01) == pytest.approx(0.01)
    assert poly(0, 100, 1.0) == 1.0 and poly(50, 100, 1.0) == pytest.approx(0.5**0.9)
    assert poly(100, 100, 1.0) == 0.0
    assert make_schedule("constant", 10, 0.3)(7) == 0.3
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("step", 10, 0.3)
