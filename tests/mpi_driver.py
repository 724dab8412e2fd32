"""Run under ``mpiexec -n 2`` by tests/test_parallel.py: one check per subcommand, a JSON line from rank 0.

    mpiexec -n 2 python tests/mpi_driver.py equivalence float64 hicd
    mpiexec -n 2 python tests/mpi_driver.py gradcheck
    mpiexec -n 2 python tests/mpi_driver.py precise
    mpiexec -n 2 python tests/mpi_driver.py fit OUT EPOCHS STOP_AFTER
    mpiexec -n 2 python tests/mpi_driver.py kill OUT    (or hang OUT)
    mpiexec -n 1 python tests/mpi_driver.py transport    (the choice of transport on NumPy)
    mpiexec -n K python tests/mpi_driver.py nccl         (CuPy with NCCL, one GPU per rank)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hicd_core.data import ArrayDataset, synthetic_pairs  # noqa: E402
from hicd_core.distill import hicd_loss  # noqa: E402
from hicd_core.model import TinySiamCD  # noqa: E402
from hicd_core.networks import build_model  # noqa: E402
from hicd_core.optim import SGD, AdamW  # noqa: E402
from hicd_core.parallel import CommunicationError, MPIComm  # noqa: E402
from hicd_core.train import DistillConfig, TrainConfig, fit, train_step  # noqa: E402

WIDTHS = (4, 8, 8, 8)
# The equivalence check uses 16 channels everywhere: with 4, windows of the change features whose
# norm is near zero make the HiCD loss so ill-conditioned at this initialisation that rounding
# differences of 1e-15 after the first step (the two paths agree that far) grow about 100x per
# step, in any two runs whose sums are ordered differently; a property of the loss there, not of
# the parallel path.
EQUIVALENCE_WIDTHS = (16, 16, 16, 16)


def report(comm, payload):
    if comm.rank == 0:
        print(json.dumps(payload), flush=True)


def equivalence(comm, dtype, method, optimizer="sgd", network="tiny-siam-cd", steps=int(os.environ.get("STEPS", 5)),
                global_batch=4, size=32):
    """K ranks on shards against one process on the global batch, same initial weights, data and dropout masks."""
    t1, t2, label = synthetic_pairs(global_batch, size, 11)
    t2_lq = np.clip(t2 + np.random.default_rng(3).normal(0, 0.05, t2.shape), 0, 1)
    t1, t2, t2_lq = (a.astype(dtype) for a in (t1, t2, t2_lq))
    teacher = build_model(network, EQUIVALENCE_WIDTHS, seed=9, dtype=dtype)
    distill = None if method == "baseline" else DistillConfig(windows=(8, None, None), change_window=8)
    per = global_batch // comm.size
    mine = slice(comm.rank * per, (comm.rank + 1) * per)

    def run(parallel):
        model = build_model(network, EQUIVALENCE_WIDTHS, seed=1, dtype=dtype)
        opt = SGD(model.params, lr=0.01, momentum=0.9) if optimizer == "sgd" else AdamW(model.params, lr=1e-2)
        part = mine if parallel else slice(None)
        losses = []
        for step in range(steps):
            terms = train_step(model, opt, t1[part], t2_lq[part], label[part], teacher=teacher,
                               teacher_x2=t2[part], distill=distill, comm=comm if parallel else None,
                               rng=np.random.default_rng([5, step]))
            losses.append(float(terms["loss"]))
        return model, losses

    model, losses = run(True)
    worst, worst_name = 0.0, None
    if comm.rank == 0:
        reference, ref_losses = run(False)
        for group in ("params", "buffers"):
            for k, v in getattr(reference, group).items():
                diff = float(np.max(np.abs(getattr(model, group)[k] - v)))
                if diff > worst:
                    worst, worst_name = diff, k
    # every rank holds the same parameters
    flat = np.concatenate([np.ravel(v) for v in model.params.values()])
    spread = float(np.max(np.abs(comm.allgather(flat[None]) - flat[None])))
    report(comm, {"max_abs_diff": worst, "worst": worst_name, "rank_spread": spread, "losses": losses})


def gradcheck(comm, h=1e-6):
    """The gathered global-correlation terms' gradient against central differences of the global loss."""
    rng = np.random.default_rng(100 + comm.rank)
    n = 2
    s1, s2, c = (rng.normal(size=shape) for shape in ((n, 3, 4, 4), (n, 3, 4, 4), (n, 2, 4, 4)))
    t_rng = np.random.default_rng(200 + comm.rank)
    t1, t2, tc = (t_rng.normal(size=shape) for shape in ((n, 5, 4, 4), (n, 5, 4, 4), (n, 3, 4, 4)))
    student = [s1, s2, c]

    def loss(features):
        value, grads = hicd_loss([(features[0], features[1])], [(t1, t2)], features[2], tc, windows=(None,),
                                 change_window=None, w_self=0.0, w_cross=0.0, w_global=1.0, comm=comm)
        return float(value), grads

    _, grads = loss(student)
    analytic = [grads["sem"][0][0], grads["sem"][0][1], grads["chg"]]
    picks = [(r, f, idx) for r in range(comm.size) for f in range(3) for idx in ((0, 0, 0, 0), (1, 1, 2, 3))]
    worst = 0.0
    for owner, f, idx in picks:  # every rank evaluates every perturbation (the loss is collective)
        values = []
        for sign in (1, -1):
            features = [a.copy() for a in student]
            if comm.rank == owner:
                features[f][idx] += sign * h
            values.append(loss(features)[0])
        numeric = (values[0] - values[1]) / (2 * h)
        if comm.rank == owner:  # each rank's gradient is the whole-batch one times the number of ranks
            worst = max(worst, abs(analytic[f][idx] / comm.size - numeric))
    worst = float(comm.allreduce_host(np.array([worst]))[0])
    report(comm, {"max_abs_error": worst})


def precise(comm):
    """``precise_statistics`` on K ranks (each its shard, synchronised BatchNorm) against one process."""
    from hicd_core.data.loader import TrainBatches
    from hicd_core.train import precise_statistics

    data = ArrayDataset(*synthetic_pairs(8, 32, 23))
    model = build_model("fc-siam-diff", EQUIVALENCE_WIDTHS, seed=1, dtype="float64", dropout=0.3)
    stats = [precise_statistics(model, TrainBatches(data, 4, rng=np.random.default_rng(6)), 3, xp=np, comm=c,
                                seed=2) for c in (comm, None)]
    worst = max(float(np.max(np.abs(stats[0][k] - stats[1][k]))) for k in stats[0])
    report(comm, {"max_abs_diff": worst})


def _config(epochs):
    # SGD: AdamW turns the rounding noise in the (gradient-free) convolution biases before each
    # BatchNorm into steps of size lr, and through the running statistics into different outputs,
    # between any two runs whose sums are ordered differently (docs/MATH.md, section 8)
    return TrainConfig(role="teacher", epochs=epochs, batch_size=4, widths=WIDTHS, optimizer="sgd", lr=0.02,
                       warmup_steps=2)


def _data():
    return ArrayDataset(*synthetic_pairs(8, 32, 21)), ArrayDataset(*synthetic_pairs(4, 32, 22))


class _Interrupted(Exception):
    pass


def fit_run(comm, out, epochs, stop_after):
    """A run of ``epochs`` epochs, interrupted on every rank after ``stop_after`` (as a killed job would be)."""
    import hicd_core.train as train

    if comm.rank != 0:  # only rank 0 may write: any write from another rank fails the run
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {comm.rank} tried to write a file")
        train.save_checkpoint = train._write_log = refuse
    history = []

    def on_epoch(record):
        history.append(record)
        if record["epoch"] == stop_after:
            raise _Interrupted

    train_set, val_set = _data()
    try:
        fit(_config(epochs), train_set, val_set, out, progress=False, comm=comm, on_epoch=on_epoch)
    except _Interrupted:
        pass
    report(comm, {"epochs": len(history), "world_size": history[-1].get("world_size")})


def stop_rank_1(comm, out, how):
    """Rank 1 dies (SIGKILL) or hangs at the start of the third epoch, after rank 0 wrote a checkpoint.

    The other rank's failure is handled as the ``hicd`` command handles it: one line, then
    an abort of the whole MPI job.
    """
    import time

    import hicd_core.train as train

    if comm.rank == 1:
        original, calls = train.train_step, [0]

        def failing_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:  # two steps per epoch: the first step of epoch 3
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return original(*args, **kwargs)
        train.train_step = failing_step
    train_set, val_set = _data()
    try:
        fit(_config(4), train_set, val_set, out, progress=False, comm=comm)
    except Exception as exc:  # noqa: BLE001 - the command's handling, reproduced
        where = "" if isinstance(exc, CommunicationError) else f"rank {comm.rank}/{comm.size}: "  # it names the rank
        print(f"hicd: error: {where}{exc}", file=sys.stderr, flush=True)
        comm.abort(3)


def transport(_comm):
    """The transport setting: checked, and NumPy arrays always on the host path."""
    from hicd_core import backend

    errors = []
    for bad in ("bogus", "NCCL"):
        try:
            MPIComm(transport=bad)
        except ValueError as exc:
            errors.append(str(exc))
    chosen = {}
    for requested in ("auto", "nccl", "mpi-host"):
        comm = MPIComm(transport=requested)
        comm.prepare(backend.namespace("numpy"))
        total = comm.allreduce_sum(np.arange(3.0))
        chosen[requested] = [comm.transport, total.tolist()]
    report(_comm, {"errors": errors, "chosen": chosen})


def nccl(_comm):
    """Collectives of CuPy arrays over NCCL against the host path, and 3 training steps on K ranks with NCCL
    against the same steps with host transport (one GPU per rank)."""
    from hicd_core import backend

    xp = backend.namespace("cupy")
    comm, host = MPIComm(transport="nccl"), MPIComm(transport="mpi-host")
    backend.use_local_device(xp, comm.local_rank)
    comm.prepare(xp)
    worst = 0.0
    for dtype in ("float32", "float64", "int64"):
        x = xp.asarray(np.arange(12).reshape(3, 4) * (comm.rank + 1), dtype=getattr(xp, dtype))
        for op in ("allreduce_sum", "allgather"):
            a, b = getattr(comm, op)(x), getattr(host, op)(x)
            assert a.dtype == x.dtype and tuple(a.shape) == tuple(b.shape), (op, dtype, a.dtype, a.shape, b.shape)
            worst = max(worst, float(xp.max(xp.abs(xp.astype(a, xp.float64) - xp.astype(b, xp.float64)))))
    t1, t2, label = (backend.from_host(a.astype("float32"), xp) for a in synthetic_pairs(2 * comm.size, 32, 5))
    part = slice(comm.rank * 2, (comm.rank + 1) * 2)
    params = []
    for c in (comm, host):
        model = TinySiamCD(WIDTHS, xp=xp, seed=1)
        opt = SGD(model.params, lr=0.01, momentum=0.9)
        for _ in range(3):
            train_step(model, opt, t1[part], t2[part], label[part], comm=c)
        params.append(model.state_dict()["params"])
    step_diff = max(float(np.max(np.abs(params[0][k] - params[1][k]))) for k in params[0])
    report(_comm, {"transport": comm.transport, "collective_max_abs_diff": worst, "step_max_abs_diff": step_diff,
                   "ranks": comm.size})


def main():
    comm = MPIComm()
    command, args = sys.argv[1], sys.argv[2:]
    if command == "transport":
        return transport(comm)
    if command == "nccl":
        return nccl(comm)
    if command == "equivalence":
        equivalence(comm, args[0], args[1], *args[2:4])
    elif command == "gradcheck":
        gradcheck(comm)
    elif command == "precise":
        precise(comm)
    elif command == "fit":
        fit_run(comm, args[0], int(args[1]), int(args[2]))
    elif command in ("kill", "hang"):
        stop_rank_1(comm, args[0], command)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
