"""Data-parallel training over MPI: the communicator that ``fit``, BatchNorm and ``hicd_loss`` share.

``mpiexec -n K hicd train ...`` (or ``fit(..., comm=MPIComm())``) trains one model on
K ranks. What each collective is for (derivations in docs/MATH.md, section 8):

- ``allreduce_sum`` of the flattened gradient buffer, once per step (``average_gradients``);
  of per-channel sums in synchronised BatchNorm (forward statistics, backward sums);
  of validation confusion counts and logged loss sums;
- ``allgather`` of the pooled vectors of HiCD's global-correlation terms, so that they
  see the global batch.

mpi4py (the optional ``mpi`` extra, with an MPI such as the ``mpich`` wheel) is imported
only when an ``MPIComm`` is made. Transport (``transport=``, or the environment variable
``HICD_MPI_TRANSPORT``; ``comm.transport`` says which one runs, and the training log records
it): ``"auto"`` (default) sends CuPy arrays through NCCL (``cupy.cuda.nccl``) on device
buffers when CuPy has NCCL, and everything else through MPI on host (NumPy) buffers, a
device-to-host copy per collective on CuPy (``"mpi-host"``); ``"nccl"`` insists on NCCL
for CuPy arrays, ``"mpi-host"`` never uses it. Host numbers (counts, logged sums) always
go through MPI.

Every collective waits at most ``timeout`` seconds (default 300, environment variable
``HICD_MPI_TIMEOUT``): a rank that died or hangs makes the others raise
``CommunicationError`` instead of waiting forever; the ``hicd`` command then aborts the
whole MPI job.
"""

from __future__ import annotations

import os
import sys
import time

from . import backend
from .errors import HicdError

ABORT_GRACE_S = 1.0  # seconds printed output gets to reach mpiexec before an abort (MPIComm.abort)

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

    def __init__(self, mpi_comm=None, *, timeout=None, transport=None):
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
        self.requested = transport if transport is not None else os.environ.get("HICD_MPI_TRANSPORT", "auto")
        if self.requested not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {self.requested!r}")
        self._nccl = None  # made by the first collective on a CuPy array (prepare)
        self.transport = "mpi-host"

    def prepare(self, xp):
        """Choose the transport for arrays of namespace ``xp`` (a collective: every rank calls it,
        at the same point; the first collective on a CuPy array calls it too). With NCCL chosen,
        ``transport`` becomes ``"nccl"``."""
        if self._nccl is not None or xp is None or not backend.is_cupy_namespace(xp) or self.requested == "mpi-host":
            return
        if not backend.nccl_available():
            if self.requested == "nccl":
                raise ImportError("transport 'nccl' needs CuPy built with NCCL (cupy.cuda.nccl_enabled is "
                                  "False here); use transport 'mpi-host' or 'auto'")
            return
        self._nccl = _NCCLTransport(self)
        self.transport = "nccl"

    def _device(self, x):
        """The NCCL transport for a CuPy array (made on first use), else None (host transport)."""
        xp = backend.array_namespace(x)
        self.prepare(xp)
        return self._nccl if backend.is_cupy_namespace(xp) else None

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
        device = self._device(x)
        if device is not None:
            return device.allreduce_sum(x)
        xp = backend.array_namespace(x)
        out = self.allreduce_host(x)
        return backend.from_host(out, xp, device=backend.device(x))

    def allgather(self, x):
        """Every rank's ``x`` (one shape on all ranks) stacked along axis 0, in rank order."""
        device = self._device(x)
        if device is not None:
            out = device.allgather(x)  # (size, *x.shape)
        else:
            send = backend.contiguous_host(x)
            out = backend.host_empty((self.size, *send.shape), send.dtype)
            self._wait(self.comm.Iallgather(send, out), "an all-gather")
            out = backend.from_host(out, backend.array_namespace(x), device=backend.device(x))
        return out.reshape((self.size * x.shape[0], *x.shape[1:])) if x.ndim else out

    def barrier(self):
        self._wait(self.comm.Ibarrier(), "a barrier")

    def abort(self, code=1):
        """End every rank of the job with exit status ``code``.

        Output already printed is flushed and given ``ABORT_GRACE_S`` seconds to reach
        ``mpiexec`` first: MPI_Abort tears the job down at once, and a line still in a
        process manager's pipe (the error that says why) is otherwise lost.
        """
        if self._nccl is not None:
            self._nccl.abort()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


_TRANSPORTS = ("auto", "nccl", "mpi-host")


class _NCCLTransport:
    """All-reduce and all-gather of CuPy arrays on device buffers through NCCL (``backend.NCCLComm``).

    Rank 0's NCCL id travels to the others by MPI. Each collective waits for its completion
    event, at most the communicator's timeout, checking NCCL's asynchronous errors meanwhile; on
    a timeout or an error the NCCL communicator is aborted and ``CommunicationError`` raised, as
    on the host path.
    """

    def __init__(self, mpi: MPIComm):
        self.mpi = mpi
        uid = backend.host_empty((backend.NCCL_ID_BYTES,), "int64")  # the id's chars, as NumPy holds them for MPI
        if mpi.rank == 0:
            uid[...] = backend.nccl_unique_id()
        mpi._wait(mpi.comm.Ibcast(uid, root=0), "sharing the NCCL id")
        self.comm = backend.NCCLComm(mpi.size, tuple(int(v) for v in uid), mpi.rank)

    def _finish(self, out, event, what):
        """``out`` once ``event`` (the collective just queued) has completed, at most the timeout."""
        deadline, pause = time.monotonic() + self.mpi.timeout, 1e-5
        while not event.done:
            try:
                self.comm.poll()
            except RuntimeError as exc:
                self.abort()
                raise CommunicationError(f"rank {self.mpi.rank}/{self.mpi.size}: NCCL failed during {what}: {exc}") \
                    from None
            if time.monotonic() > deadline:
                self.abort()
                raise CommunicationError(f"rank {self.mpi.rank}/{self.mpi.size}: no answer from the other ranks "
                                         f"within {self.mpi.timeout:g} s during {what} over NCCL (did a rank die "
                                         "or stop?)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        return out

    def allreduce_sum(self, x):
        return self._finish(*self.comm.allreduce_sum(x), "an all-reduce")

    def allgather(self, x):
        return self._finish(*self.comm.allgather(x), "an all-gather")

    def abort(self):
        self.comm.abort()


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
