"""Data-parallel training over MPI: the communicator that ``fit``, BatchNorm and ``hicd_loss`` share.

``mpiexec -n K hicd train ...`` (or ``fit(..., comm=MPIComm())``) trains one model on
K ranks. What each collective is for (derivations in docs/MATH.md, section 8):

- ``allreduce_sum`` of the flattened gradient buffer, once per step (``average_gradients``);
  of per-channel sums in synchronised BatchNorm (forward statistics, backward sums);
  of validation confusion counts and logged loss sums;
- ``allgather`` of the pooled vectors of HiCD's global-correlation terms, so that they
  see the global batch.

mpi4py (the optional ``mpi`` extra, with an MPI such as the ``mpich`` wheel) is imported
only when an ``MPIComm`` is made. Arrays of any backend travel through host (NumPy)
buffers; on CuPy that is a device-to-host copy per collective (``transport`` says
``"mpi-host"``). NCCL transport is not implemented yet (see docs/PERFORMANCE.md).

Every collective waits at most ``timeout`` seconds (default 300, environment variable
``HICD_MPI_TIMEOUT``): a rank that died or hangs makes the others raise
``CommunicationError`` instead of waiting forever; the ``hicd`` command then aborts the
whole MPI job.
"""

from __future__ import annotations

import os
import time

from . import backend
from .errors import HicdError

__all__ = ["MPIComm", "CommunicationError", "launched_by_mpi", "average_gradients", "shard"]

# the world size as MPICH / Hydra, Open MPI, Intel MPI and PMIx launchers announce it
_LAUNCHER_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


class CommunicationError(HicdError):
    """A collective operation failed or timed out (another rank died or hangs)."""


def launched_by_mpi() -> int:
    """The world size announced by an MPI launcher's environment (``mpiexec -n K``), or 1."""
    for name in _LAUNCHER_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 1:
            return int(value)
    return 1


class MPIComm:
    """An MPI communicator for data-parallel training (default: ``MPI.COMM_WORLD``).

    ``rank``, ``size``, ``local_rank`` (among the ranks of this node); ``allreduce_sum(x)``
    (elementwise sum over ranks, same shape and namespace), ``allgather(x)`` (the ranks'
    arrays stacked along axis 0, in rank order), ``allreduce_host(values)`` (host numbers
    summed over ranks), ``barrier()`` and ``abort(code)``. ``timeout``: seconds any
    collective may wait (default ``HICD_MPI_TIMEOUT`` or 300).
    """

    def __init__(self, mpi_comm=None, *, timeout=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ImportError("training on several processes needs mpi4py and an MPI: "
                              "pip install 'hicd[mpi]'") from None
        self.MPI = MPI
        self.comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # the rank among the processes of this node (which GPU a rank takes: backend.use_local_device)
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        raw = timeout if timeout is not None else os.environ.get("HICD_MPI_TIMEOUT", 300)
        try:
            self.timeout = float(raw)
        except ValueError:
            raise ValueError(f"HICD_MPI_TIMEOUT must be a number of seconds, got {raw!r}") from None
        if not self.timeout > 0:
            raise ValueError(f"the collective timeout must be positive, got {raw!r}")
        self.transport = "mpi-host"

    def __repr__(self):
        return f"MPIComm(rank={self.rank}, size={self.size}, transport={self.transport!r})"

    def _wait(self, request, what):
        """Wait for a non-blocking collective, at most ``timeout`` seconds."""
        if request.Test():
            return
        start = time.monotonic()
        spin_until, deadline = start + 2e-3, start + self.timeout
        pause = 0.0  # yield only for the first 2 ms (ranks in lockstep arrive together), then back off to 1 ms
        while not request.Test():
            now = time.monotonic()
            if now > deadline:
                raise CommunicationError(f"rank {self.rank}/{self.size}: no answer from the other ranks within "
                                         f"{self.timeout:g} s during {what} (did a rank die or stop?)")
            if now > spin_until:
                pause = min(max(pause * 2, 1e-5), 1e-3)
            time.sleep(pause)

    def allreduce_host(self, values):
        """Elementwise sum over ranks of host numbers (a NumPy array or a list: ints as int64,
        floats as float64); a NumPy array."""
        send = backend.contiguous_host(values)
        out = backend.host_empty(send.shape, send.dtype)
        self._wait(self.comm.Iallreduce(send, out, op=self.MPI.SUM), "an all-reduce")
        return out

    def allreduce_sum(self, x):
        """Elementwise sum over ranks of ``x`` (any backend), in ``x``'s namespace and dtype."""
        xp = backend.array_namespace(x)
        out = self.allreduce_host(x)
        return backend.from_host(out, xp, device=backend.device(x))

    def allgather(self, x):
        """Every rank's ``x`` (one shape on all ranks) stacked along axis 0, in rank order."""
        xp = backend.array_namespace(x)
        send = backend.contiguous_host(x)
        out = backend.host_empty((self.size, *send.shape), send.dtype)
        self._wait(self.comm.Iallgather(send, out), "an all-gather")
        out = out.reshape((self.size * send.shape[0], *send.shape[1:])) if send.ndim else out
        return backend.from_host(out, xp, device=backend.device(x))

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "a barrier")

    def abort(self, code=1):
        self.comm.Abort(code)


def average_gradients(grads: dict, comm) -> dict:
    """The mean over ranks of every gradient, through one all-reduce of one flattened buffer.

    Parameter order is the dict's (the same on every rank: the model's parameter order).
    """
    names = list(grads)
    first = grads[names[0]]
    xp = backend.array_namespace(first)
    flat = xp.concat([xp.reshape(grads[k], (-1,)) for k in names])
    total = comm.allreduce_sum(flat) * (1.0 / comm.size)
    out, start = {}, 0
    for k in names:
        n = 1
        for d in grads[k].shape:
            n *= d
        out[k] = xp.reshape(total[start : start + n], grads[k].shape)
        start += n
    return out


def shard(n: int, comm) -> slice:
    """This rank's part of a global batch of ``n`` samples (``n`` divisible by the world size)."""
    if comm is None:
        return slice(0, n)
    if n % comm.size:
        raise ValueError(f"a global batch of {n} samples does not split evenly over {comm.size} ranks; "
                         "choose a batch size that is a multiple of the number of ranks")
    per = n // comm.size
    return slice(comm.rank * per, (comm.rank + 1) * per)
