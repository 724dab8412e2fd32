"""Probe: one process, HiCD training steps alternating between this tree's ``hicd_loss`` and that
of another checkout, every other block of four steps; prints the median step time of each.

    git archive REV | tar -x -C /tmp/rev && cp -r /tmp/rev/hicd_core /tmp/pkg/hicd_old
    OMP_NUM_THREADS=2 python docs/perf/loss_ab_in_step.py /tmp/pkg REV

Everything but the loss (model, optimiser, data) is this tree's, so the two blocks differ in
the loss alone, and the host's slow and fast phases fall on both.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def hicd_step():
    """``(step, train module)``: one HiCD training step of the benchmark's setup (batch 8, 64x64)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import hicd_core.train as train
    from bench import make_batch
    from hicd_core import backend
    from hicd_core.model import DEFAULT_WIDTHS, TinySiamCD
    from hicd_core.optim import AdamW

    backend.keep_host_memory()
    xp = backend.namespace("numpy")
    x1, x2, x2_hq, label = (backend.from_host(a, xp) for a in make_batch(8, 64))
    student, teacher = TinySiamCD(DEFAULT_WIDTHS, xp=xp, seed=0), TinySiamCD(DEFAULT_WIDTHS, xp=xp, seed=1)
    opt = AdamW(student.params, lr=1e-3, weight_decay=1e-2)
    windows, change_window = train.default_windows(64)
    distill = train.DistillConfig(method="hicd", windows=windows, change_window=change_window)
    return (lambda: train.train_step(student, opt, x1, x2, label, teacher=teacher, teacher_x2=x2_hq,
                                     distill=distill)), train


def main():
    step, train = hicd_step()
    sys.path.append(sys.argv[1])
    import hicd_old.distill as other

    losses = {"this tree": train.hicd_loss, sys.argv[2]: other.hicd_loss}
    times = {name: [] for name in losses}
    for _ in range(3):
        step()
    for block in range(16):
        name = list(losses)[block % 2]
        train.hicd_loss = losses[name]
        for _ in range(4):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    print(json.dumps({"probe": "hicd_loss A/B in a training step", "steps_each": 32,
                      "step_ms": {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
