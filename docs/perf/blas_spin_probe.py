"""Probe: two host threads of NumPy elementwise work right after a multithreaded BLAS product,
and after the BLAS threads have gone to sleep; serial work beside it.

    OMP_NUM_THREADS=2 python docs/perf/blas_spin_probe.py

After a product that used several BLAS threads, OpenBLAS keeps its idle threads spinning for a
while before they sleep; work on a second thread of our own then shares a core with one. The
threaded job runs with BLAS limited to one thread (threadpoolctl), as a threaded loss would.
Prints one JSON line: median milliseconds of 15 runs of each case, and of the threaded work
after pauses of 0.01 to 0.2 s (how long the idle worker spins).
"""

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

blas = ThreadpoolController()
rng = np.random.default_rng(0)
A = rng.random((1000, 1000), dtype=np.float32)
blocks = [rng.random((32, 64, 64), dtype=np.float32) for _ in range(2)]  # two blocks of correlations
pool = ThreadPoolExecutor(2)


def job(x):
    for _ in range(40):
        np.exp(x)


def threaded():
    with blas.limit(limits=1, user_api="blas"):
        list(pool.map(job, blocks))


def serial():
    for x in blocks:
        job(x)


def median_ms(work, pause):
    times = []
    for _ in range(15):
        A @ A  # uses the BLAS threads
        if pause:
            time.sleep(pause)
        t0 = time.perf_counter()
        work()
        times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


result = {}
for when, pause in (("right after the product", 0.0), ("0.3 s after the product", 0.3)):
    for name, work in (("two threads", threaded), ("one thread", serial)):
        result[f"{name}, {when}"] = median_ms(work, pause)
# how long the idle BLAS worker keeps spinning: the threaded work after shorter pauses
sweep = {f"{pause} s": median_ms(threaded, pause) for pause in (0.01, 0.05, 0.1, 0.2)}
print(json.dumps({"probe": "NumPy work on two threads after a multithreaded BLAS product", "ms": result,
                  "two threads after a pause, ms": sweep}))
