"""Timing helpers shared by the benchmark scripts (median of synchronised wall-clock times)."""

from __future__ import annotations

import statistics
import time


def device_sync(xp):
    """A function that waits for the device of namespace ``xp`` (a no-op on the CPU)."""
    from hicd_core import backend

    if backend.is_cupy_namespace(xp):
        import cupy

        return cupy.cuda.Device().synchronize
    return lambda: None


def torch_sync(torch, device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def median_ms(fn, sync, repeats, warmup=2):
    """Median and all times in milliseconds of ``repeats`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def interleaved_ms(fns, syncs, repeats, block=5):
    """``(median, times)`` in milliseconds of each function, timed in alternating blocks of ``block`` steps.

    Each block starts with one untimed step (the other side's threads may still be spinning,
    its data is out of the caches); the rounds go on until every function has ``repeats``
    timed steps. Both sides see the same phases of a noisy machine, so their ratio moves
    less than that of two back-to-back runs.
    """
    times = [[] for _ in fns]
    while min(len(t) for t in times) < repeats:
        for fn, sync, out in zip(fns, syncs, times):
            for i in range(block + 1):
                start = time.perf_counter()
                fn()
                sync()
                if i:
                    out.append((time.perf_counter() - start) * 1e3)
    return [(statistics.median(t[:repeats]), t[:repeats]) for t in times]


def host_fields():
    """What a CPU figure depends on: the core count, the machine, the load and the BLAS threads."""
    import os
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def emit(row, out=None):
    """Print one JSON line and, with ``out``, append it to that file."""
    import json

    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
