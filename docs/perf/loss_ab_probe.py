"""Probe: ``hicd_loss`` alone, this tree's against another checkout's, in one process.

    git archive REV hicd_core | tar -x -C /tmp/pkg && mv /tmp/pkg/hicd_core /tmp/pkg/hicd_old
    OMP_NUM_THREADS=1 python docs/perf/loss_ab_probe.py /tmp/pkg REV

Alternating blocks of five calls (after one untimed call each) on the inputs of
``benchmarks/bench_loss.py``; prints one JSON line with the medians of the wall time and of
the calling thread's CPU time (``time.thread_time``, which a busy host's other work moves
less than the wall clock; at one thread it is all of the loss's work).
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [sys.argv[1], str(ROOT), str(ROOT / "benchmarks")]

import hicd_old  # noqa: E402
from bench_loss import CHG_WINDOW, SEM_WINDOWS, make_inputs  # noqa: E402

import hicd_core  # noqa: E402
from hicd_core import backend  # noqa: E402

backend.keep_host_memory()
s_sem, t_sem, c_s, c_t = make_inputs(8)
calls = {name: (lambda m=m: m.hicd_loss(s_sem, t_sem, c_s, c_t, windows=SEM_WINDOWS, change_window=CHG_WINDOW))
         for name, m in (("this tree", hicd_core), (sys.argv[2], hicd_old))}
wall = {name: [] for name in calls}
cpu = {name: [] for name in calls}
for _ in range(20):
    for name, call in calls.items():
        call()
        for _ in range(5):
            w0, c0 = time.perf_counter(), time.thread_time()
            call()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
ms = lambda v: round(1e3 * statistics.median(v), 1)  # noqa: E731
print(json.dumps({"probe": "hicd_loss A/B alone", "calls_each": 100, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                  "wall_ms": {k: ms(v) for k, v in wall.items()}, "cpu_ms": {k: ms(v) for k, v in cpu.items()}}))
