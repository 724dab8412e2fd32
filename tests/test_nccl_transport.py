"""The NCCL transport's waiting, timeout and error handling, with a stand-in for the device communicator.

The device half (``backend.NCCLComm``) needs CuPy with NCCL and a GPU (tests/test_parallel.py
checks it against the host path there); what ``parallel`` adds around it runs anywhere.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from hicd_core.parallel import CommunicationError, _NCCLTransport


class _Event:
    def __init__(self, done_after):
        self.ready_at = time.monotonic() + done_after

    @property
    def done(self):
        return time.monotonic() >= self.ready_at


class _FakeDevice:
    """Queues "collectives" that complete after ``delay`` seconds; ``error`` makes ``poll`` fail."""

    def __init__(self, size, delay=0.0, error=None):
        self.size, self.delay, self.error, self.aborted = size, delay, error, False

    def allreduce_sum(self, x):
        return x * self.size, _Event(self.delay)

    def allgather(self, x):
        return np.stack([x] * self.size), _Event(self.delay)

    def poll(self):
        if self.error:
            raise RuntimeError(self.error)

    def abort(self):
        self.aborted = True


def transport(device, timeout=5.0):
    t = _NCCLTransport.__new__(_NCCLTransport)  # without the id exchange, which needs MPI and a GPU
    t.mpi, t.comm = SimpleNamespace(rank=0, size=device.size, timeout=timeout), device
    return t


def test_results_come_back_once_the_collective_completed():
    t = transport(_FakeDevice(2, delay=0.05))
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(t.allreduce_sum(x), 2 * x)
    np.testing.assert_array_equal(t.allgather(x), np.stack([x, x]))  # ranks on a new leading axis (MPIComm flattens)
    assert t.allgather(np.float64(3.0)).shape == (2,)


def test_a_collective_that_never_completes_times_out_and_aborts():
    device = _FakeDevice(2, delay=3600)
    started = time.monotonic()
    with pytest.raises(CommunicationError, match=r"rank 0/2: no answer .* within 0.2 s during an all-reduce over NCCL"):
        transport(device, timeout=0.2).allreduce_sum(np.zeros(3))
    assert device.aborted and time.monotonic() - started < 5


def test_an_asynchronous_nccl_error_aborts_and_names_the_collective():
    device = _FakeDevice(2, delay=3600, error="unhandled system error")
    with pytest.raises(CommunicationError, match="NCCL failed during an all-gather: unhandled system error"):
        transport(device).allgather(np.zeros(3))
    assert device.aborted
