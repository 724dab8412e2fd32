"""Optimizers over named parameters (AdamW, SGD with momentum) and learning-rate schedules.

Parameters live in a dict ``name -> array`` (a model's ``params``); ``step``
replaces each entry with its updated array, so arrays a caller still holds are
never modified. The optimizers own their moment buffers and update those in
place. Weight decay is not applied to BatchNorm parameters and biases
(``no_decay``), as is common practice.
"""

from __future__ import annotations

import math

from . import backend
from .backend import array_namespace
from .errors import CheckpointError

__all__ = ["AdamW", "SGD", "no_decay", "cosine_with_warmup", "poly", "make_schedule"]


def no_decay(name: str) -> bool:
    """True for parameters that get no weight decay: biases and BatchNorm weights."""
    return name.endswith(".bias") or ".bn." in name


class _Optimizer:
    kind = "base"
    _slots: tuple = ()

    def __init__(self, params: dict, lr: float, weight_decay: float, decay_filter=no_decay):
        if not params:
            raise ValueError("optimizer got no parameters")
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.lr, self.weight_decay, self.decay_filter = float(lr), float(weight_decay), decay_filter
        self.step_count = 0
        self.state = {slot: {name: _zeros_like(p) for name, p in params.items()} for slot in self._slots}

    def _check(self, params, grads):
        missing = [n for n in params if n not in grads or grads[n] is None]
        if missing:
            raise ValueError(f"no gradient for parameters {missing}")
        for n, p in params.items():
            if tuple(grads[n].shape) != tuple(p.shape):
                raise ValueError(f"gradient of {n} has shape {tuple(grads[n].shape)}, parameter {tuple(p.shape)}")

    # -- state for checkpoints (host arrays)

    def state_dict(self) -> dict:
        out = {"kind": self.kind, "step": self.step_count}
        for slot, bufs in self.state.items():
            out[slot] = {n: backend.to_host(b).copy() for n, b in bufs.items()}
        return out

    def load_state_dict(self, state: dict, *, source: str = "state") -> None:
        if state.get("kind") != self.kind:
            raise CheckpointError(f"{source}: optimizer state is for {state.get('kind')!r}, expected {self.kind!r}")
        new = {}
        for slot, bufs in self.state.items():
            given = state.get(slot)
            if not isinstance(given, dict) or set(given) != set(bufs):
                raise CheckpointError(f"{source}: optimizer slot {slot!r} does not match the parameters")
            for n, b in bufs.items():
                expected_dtype = backend.to_host(b).dtype
                if tuple(given[n].shape) != tuple(b.shape) or given[n].dtype != expected_dtype:
                    raise CheckpointError(
                        f"{source}: optimizer {slot}/{n} has shape {tuple(given[n].shape)} dtype {given[n].dtype}, "
                        f"expected {tuple(b.shape)} {expected_dtype}"
                    )
                xp = array_namespace(b)
                new[(slot, n)] = backend.from_host(given[n], xp, dtype=given[n].dtype)
        for (slot, n), arr in new.items():
            self.state[slot][n] = arr
        self.step_count = int(state["step"])


def _zeros_like(p):
    xp = array_namespace(p)
    return xp.zeros_like(p)


class AdamW(_Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``.

    Per step ``t`` (from 1), for a parameter ``p`` with gradient ``g``::

        p <- p (1 - lr wd)                      (only if decayed)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    kind = "adamw"
    _slots = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, decay_filter=no_decay):
        super().__init__(params, lr, weight_decay, decay_filter)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        self._check(params, grads)
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        b1, b2 = self.betas
        bc1, bc2 = 1.0 - b1**self.step_count, 1.0 - b2**self.step_count
        for name, p in params.items():
            xp = array_namespace(p)
            g = grads[name]
            m, v = self.state["m"][name], self.state["v"][name]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            if self.weight_decay and not self.decay_filter(name):
                p = p * (1.0 - lr * self.weight_decay)
            params[name] = p - (lr / bc1) * m / (xp.sqrt(v * (1.0 / bc2)) + self.eps)


class SGD(_Optimizer):
    """SGD with momentum and L2 weight decay, as ``torch.optim.SGD``::

        g <- g + wd p   (only if decayed);   buf <- momentum buf + g;   p <- p - lr buf
    """

    kind = "sgd"
    _slots = ("momentum_buffer",)

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=0.0, decay_filter=no_decay):
        super().__init__(params, lr, weight_decay, decay_filter)
        self.momentum = float(momentum)

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        self._check(params, grads)
        lr = self.lr if lr is None else float(lr)
        self.step_count += 1
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and not self.decay_filter(name):
                g = g + self.weight_decay * p
            buf = self.state["momentum_buffer"][name]
            if self.step_count == 1:
                buf += g  # torch initialises the buffer with the first gradient
            else:
                buf *= self.momentum
                buf += g
            params[name] = p - lr * buf


def cosine_with_warmup(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr``, then cosine decay to ``min_lr``.

    ``step`` counts from 0; ``lr(step)`` is the rate used by the step's update.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def poly(step: int, total_steps: int, base_lr: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """Polynomial decay ``base_lr (1 - step / total_steps)^power`` (floored at ``min_lr``)."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return max(base_lr * (1.0 - progress) ** power, min_lr)


def make_schedule(name: str, total_steps: int, base_lr: float, **kw):
    """``step -> lr`` for ``name`` in {"cosine", "poly", "constant"}."""
    if name == "cosine":
        return lambda step: cosine_with_warmup(step, total_steps, base_lr, **kw)
    if name == "poly":
        return lambda step: poly(step, total_steps, base_lr, **kw)
    if name == "constant":
        return lambda step: base_lr
    raise ValueError(f"unknown schedule {name!r}; choose cosine, poly or constant")
