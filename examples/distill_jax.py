"""HiCD inside a plain JAX training loop: a frozen JAX teacher, a JAX student, ``hicd_core.jax.hicd_loss`` under ``jit``.

    pip install -e .[jax]
    python examples/distill_jax.py     # about a minute on 2 CPU cores
    python examples/distill_jax.py --steps 20 --size 16   # a smoke run

A small Siamese CNN written with ``jax.lax`` convolutions (conv-ReLU encoder shared
by both dates, |difference| fusion at two scales, a decoder and a 1x1 head; plain
parameter dicts and a hand-written Adam, so that nothing beyond ``jax`` is needed)
is trained as a teacher on the built-in synthetic high-quality pairs; then a
student, started from the teacher's weights, learns on pairs whose t2 is degraded
(``--setting``) with BCE plus the HiCD loss against the frozen teacher's encoder
taps and change features. The whole student step, HiCD loss included, is one
``jax.jit``-compiled function of ``jax.grad``. It prints the losses as they fall and
the final F1 on a held-out degraded test set. Nothing here is tuned; it shows the
wiring, not a result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core.metrics import change_metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distill_common import make_data, parse_args  # noqa: E402


def main(argv=None):
    args = parse_args(__doc__, argv)
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("distill_jax.py: error: needs JAX (pip install -e .[jax])", file=sys.stderr)
        return 2
    from hicd_core.jax import hicd_loss

    def conv(x, w, b, stride=1):
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return y + b[None, :, None, None]

    def init(key, w1=8, w2=16):
        shapes = {"enc1a": (w1, 3), "enc1b": (w1, w1), "enc2a": (w2, w1), "enc2b": (w2, w2), "dec2": (w1, w2),
                  "dec1": (w1, 2 * w1)}
        params = {}
        for name, (o, i) in shapes.items():
            key, sub = jax.random.split(key)
            params[name] = (jax.random.normal(sub, (o, i, 3, 3)) * np.sqrt(2.0 / (9 * i)), jnp.zeros(o))
        key, sub = jax.random.split(key)
        params["head"] = (jax.random.normal(sub, (1, w1, 1, 1)) * np.sqrt(1.0 / w1), jnp.zeros(1))
        return params

    def forward(params, x1, x2):
        n = x1.shape[0]
        relu = jax.nn.relu
        e1 = relu(conv(relu(conv(jnp.concatenate([x1, x2]), *params["enc1a"])), *params["enc1b"]))
        e2 = relu(conv(relu(conv(e1, *params["enc2a"], stride=2)), *params["enc2b"]))
        d = relu(conv(jnp.abs(e2[:n] - e2[n:]), *params["dec2"]))
        d = jnp.repeat(jnp.repeat(d, 2, axis=2), 2, axis=3)
        d1 = relu(conv(jnp.concatenate([d, jnp.abs(e1[:n] - e1[n:])], axis=1), *params["dec1"]))
        return conv(d1, *params["head"])[:, 0], (e2[:n], e2[n:]), d1

    def bce(logits, y):
        return jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))

    side = args.size // 2
    window = 4 if side % 4 == 0 and side >= 8 else None

    def loss_fn(params, teacher, x1, x2, hq, y, weight):
        logits, taps, d1 = forward(params, x1, x2)
        task = bce(logits, y)
        if teacher is None:
            return task, (task, 0.0)
        _, t_taps, t_d1 = forward(teacher, x1, hq)
        t_taps, t_d1 = jax.lax.stop_gradient((t_taps, t_d1))
        distill = weight * hicd_loss([taps], [t_taps], d1, t_d1, windows=[window], change_window=4)
        return task + distill, (task, distill)

    def adam_step(params, state, grads, step, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8):
        m, v = state
        m = jax.tree_util.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        scale = lr * jnp.sqrt(1 - b2 ** step) / (1 - b1 ** step)
        params = jax.tree_util.tree_map(lambda p, m_, v_: p - scale * m_ / (jnp.sqrt(v_) + eps), params, m, v)
        return params, (m, v)

    @jax.jit
    def teacher_step(params, state, step, x1, x2, y):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, x1, x2, x2, y, 0.0)
        params, state = adam_step(params, state, grads, step)
        return params, state, parts

    @jax.jit
    def student_step(params, state, step, teacher, x1, x2, hq, y):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, teacher, x1, x2, hq, y, args.weight)
        params, state = adam_step(params, state, grads, step)
        return params, state, parts

    (t1, t2, label), (s1, s2, s2_lq, s_label), lq = make_data(args)
    rng = np.random.default_rng(args.seed)

    def train(params, teacher=None):
        state = (jax.tree_util.tree_map(jnp.zeros_like, params), jax.tree_util.tree_map(jnp.zeros_like, params))
        for step in range(1, args.steps + 1):
            idx = rng.choice(len(t1), 8, replace=False)
            x1, hq, y = jnp.asarray(t1[idx]), jnp.asarray(t2[idx]), jnp.asarray(label[idx], jnp.float32)
            if teacher is None:
                params, state, (task, distill) = teacher_step(params, state, step, x1, hq, y)
            else:
                x2 = jnp.asarray(lq(t2[idx], int(rng.integers(2**31))))
                params, state, (task, distill) = student_step(params, state, step, teacher, x1, x2, hq, y)
            if step % max(args.steps // 6, 1) == 0 or step == 1:
                role = "teacher" if teacher is None else "student"
                print(f"{role} step {step:4d}: BCE {float(task):.4f}  HiCD {float(distill):.4f}", flush=True)
        return params

    def f1_of(params, a, b):
        logits = jax.jit(forward)(params, jnp.asarray(a), jnp.asarray(b))[0]
        return change_metrics(np.asarray(logits) >= 0, s_label)["f1"]

    teacher = train(init(jax.random.PRNGKey(args.seed)))
    student = train(teacher, teacher)  # starts from the teacher's weights (arrays are immutable: no copy needed)
    print(f"held-out {args.setting} test pairs: teacher HQ/HQ F1 {f1_of(teacher, s1, s2):.2f}, "
          f"teacher HQ/LQ F1 {f1_of(teacher, s1, s2_lq):.2f}, HiCD student F1 {f1_of(student, s1, s2_lq):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
