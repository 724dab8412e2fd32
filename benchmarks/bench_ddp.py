"""Data-parallel training throughput: pairs per second on K ranks, and the scaling efficiency.

    python benchmarks/bench_ddp.py                       # K = 1
    mpiexec -n 2 python benchmarks/bench_ddp.py          # K = 2 (one line from rank 0)
    python benchmarks/bench_ddp.py --estimate            # communication per step on GPU clusters, on paper

Times ``--steps`` training steps (after ``--warmup``) of the default TinySiamCD on a global
batch of ``--batch`` synthetic pairs of ``--size``², each rank on its shard (teacher: task
loss; ``--method hicd``: a HiCD student against a fresh teacher), with synchronised BatchNorm
and one gradient all-reduce per step. Prints one JSON line: medians of the step time, pairs/s
of the whole job, and the median time of the gradient all-reduce alone. Scaling efficiency =
pairs/s at K / (K x pairs/s at 1), from two such lines (``--out`` appends them to a file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hicd_core import backend  # noqa: E402
from hicd_core.data import synthetic_pairs  # noqa: E402
from hicd_core.model import TinySiamCD  # noqa: E402
from hicd_core.optim import AdamW  # noqa: E402
from hicd_core.parallel import MPIComm, average_gradients, launched_by_mpi, shard  # noqa: E402
from hicd_core.train import DistillConfig, default_windows, train_step  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import emit, host_fields  # noqa: E402

# links for the paper estimate, bytes per second per GPU, as vendors quote them (bus bandwidth)
LINKS = {"8 GPUs in one node (NVLink 4, ~450 GB/s per GPU per direction)": 450e9,
         "4 nodes x 8 GPUs (one 400 Gb/s InfiniBand NIC per GPU, ~50 GB/s)": 50e9}


def estimate():
    """Gradient bytes per step and the time of a ring all-reduce of them on each link."""
    model = TinySiamCD()
    params = model.num_parameters()
    bn_layers = sum(1 for k in model.params if k.endswith(".bn.weight"))
    rows = []
    for name, bandwidth in LINKS.items():
        ranks = 8 if "one node" in name else 32
        moved = 2 * (ranks - 1) / ranks * params * 4  # a ring all-reduce sends and receives this per rank
        rows.append({"link": name, "ranks": ranks, "gradient_bytes": params * 4, "bytes_moved_per_rank": round(moved),
                     "seconds_per_step_at_bandwidth": moved / bandwidth,
                     # synchronised BatchNorm: two (C,) all-reduces forward and one (2C,) backward per layer;
                     # tiny, so each costs a collective's latency (~10-50 us with NCCL), not bandwidth
                     "small_allreduces_per_step": 3 * bn_layers})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--method", choices=["task", "hicd"], default="task")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--estimate", action="store_true", help="print the paper estimate of communication only")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args(argv)
    if args.estimate:
        for row in estimate():
            print(json.dumps(row))
        return 0

    backend.keep_host_memory()
    comm = MPIComm() if launched_by_mpi() > 1 else None
    xp = backend.namespace(args.backend)
    t1, t2, label = synthetic_pairs(args.batch, args.size, 0)
    part = shard(args.batch, comm)
    x1, x2, y = (backend.from_host(a[part], xp) for a in (t1, t2, label))
    model = TinySiamCD(xp=xp, seed=0)
    optimizer = AdamW(model.params, lr=1e-3)
    teacher = distill = None
    if args.method == "hicd":
        teacher = TinySiamCD(xp=xp, seed=1)
        windows, change_window = default_windows(args.size)
        distill = DistillConfig(windows=windows, change_window=change_window)
    sync = (lambda: None) if comm is None else comm.barrier
    times, reduce_times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, x1, x2, y, teacher=teacher, distill=distill, comm=comm, check_finite=False)
        float(model.params["head.bias"][0])  # wait for the device
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if comm is not None:  # the gradient all-reduce alone, on a buffer of the model's size
        grads = {k: xp.ones_like(v) for k, v in model.params.items()}
        for i in range(args.warmup + args.steps):
            comm.barrier()
            start = time.perf_counter()
            average_gradients(grads, comm)
            if i >= args.warmup:
                reduce_times.append(time.perf_counter() - start)
    ranks = 1 if comm is None else comm.size
    step = statistics.median(times)
    row = {"bench": "ddp", "method": args.method, "ranks": ranks, "global_batch": args.batch, "size": args.size,
           "backend": args.backend, "step_ms_median": round(step * 1e3, 1),
           "pairs_per_s": round(args.batch / step, 2),
           "allreduce_ms_median": round(statistics.median(reduce_times) * 1e3, 2) if reduce_times else 0.0,
           "gradient_mb": round(model.num_parameters() * 4 / 2**20, 2),
           "transport": "none" if comm is None else comm.transport, **host_fields()}
    if comm is None or comm.rank == 0:
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
