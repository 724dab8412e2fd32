"""Probe (kept for the record; needs commit 09618b4 and threadpoolctl): the threaded HiCD loss inside
a training step against the serial one, in one process.

Commit 09618b4 ran ``hicd_loss``'s independent window terms on host threads
(``backend.run_independent``, which read ``OMP_NUM_THREADS`` on every call). This script
alternates blocks of HiCD training steps with the loss threaded (``OMP_NUM_THREADS=2`` in
the environment) and serial (``1``; BLAS keeps the threads it started with) and prints one
JSON line: the median time of the loss alone and of the whole step for each. Run from a
checkout of 09618b4:

    OMP_NUM_THREADS=2 python docs/perf/loss_threads_probe.py
    OPENBLAS_THREAD_TIMEOUT=4 OMP_NUM_THREADS=2 python docs/perf/loss_threads_probe.py
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root), str(root / "benchmarks")]

import hicd_core.train as train  # noqa: E402
from bench import make_batch  # noqa: E402
from hicd_core import backend  # noqa: E402
from hicd_core.model import DEFAULT_WIDTHS, TinySiamCD  # noqa: E402
from hicd_core.optim import AdamW  # noqa: E402

backend.keep_host_memory()
xp = backend.namespace("numpy")
x1, x2, x2_hq, label = (backend.from_host(a, xp) for a in make_batch(8, 64))
student, teacher = TinySiamCD(DEFAULT_WIDTHS, xp=xp, seed=0), TinySiamCD(DEFAULT_WIDTHS, xp=xp, seed=1)
opt = AdamW(student.params, lr=1e-3, weight_decay=1e-2)
windows, change_window = train.default_windows(64)
distill = train.DistillConfig(method="hicd", windows=windows, change_window=change_window)

loss_s = {"threaded": [], "serial": []}
step_s = {"threaded": [], "serial": []}
mode = "threaded"
original = train.hicd_loss


def timed_loss(*args, **kwargs):
    t0 = time.perf_counter()
    out = original(*args, **kwargs)
    loss_s[mode].append(time.perf_counter() - t0)
    return out


train.hicd_loss = timed_loss
step = lambda: train.train_step(student, opt, x1, x2, label, teacher=teacher, teacher_x2=x2_hq,  # noqa: E731
                                distill=distill)
for _ in range(3):
    step()
loss_s["threaded"].clear()
for block in range(12):
    mode = "threaded" if block % 2 == 0 else "serial"
    os.environ["OMP_NUM_THREADS"] = "2" if mode == "threaded" else "1"
    for _ in range(4):
        t0 = time.perf_counter()
        step()
        step_s[mode].append(time.perf_counter() - t0)
ms = lambda v: round(1e3 * float(np.median(v)), 1)  # noqa: E731
print(json.dumps({"probe": "threaded hicd_loss in a training step", "steps_each": 24,
                  "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                  "loss_ms": {k: ms(v) for k, v in loss_s.items()}, "step_ms": {k: ms(v) for k, v in step_s.items()}}))
