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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_ab_in_step import hicd_step  # noqa: E402  (the same step as the A/B probe beside this one)

step, train = hicd_step()
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
