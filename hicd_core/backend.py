"""Backend shim: the one module that knows NumPy, CuPy and array-api-strict exist.

Every array function of ``hicd_core`` starts with ``xp = array_namespace(...)``
and then uses only the array API standard's functions through ``xp``. This
module provides that namespace lookup, the host <-> device transfers that happen
at the edges (data loading, logging, checkpoints), and the few helpers the
standard lacks.

Namespace lookup is delegated to ``array_api_compat``: it returns a
standard-conforming wrapper for NumPy and CuPy arrays (CuPy 14 arrays carry no
``__array_namespace__``, array-api-compat recognises them by type) and the
library itself for namespaces that conform already (array-api-strict).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import numbers
import os
import sys
import threading

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "namespace",
    "is_numpy_namespace",
    "is_cupy_namespace",
    "mutable_namespace",
    "is_tracing",
    "as_arrays",
    "to_host",
    "from_host",
    "all_finite",
    "available_backends",
    "host_rng",
    "normal",
    "device",
    "keep_host_memory",
    "run_independent",
    "conv_threads",
    "conv_thread_count",
    "nccl_available",
    "nccl_unique_id",
    "NCCLComm",
]

_BACKENDS = {
    "numpy": "array_api_compat.numpy",
    "cupy": "array_api_compat.cupy",
    "array_api_strict": "array_api_strict",
}


def array_namespace(*arrays):
    """Return the array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises
    ------
    TypeError
        If the arrays belong to different namespaces (say NumPy and CuPy), or if
        one of them is not an array at all. The message names the types.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("hicd: expected at least one array, got none")
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in present})
        raise TypeError(
            f"hicd: inputs must be arrays of one array-API namespace, got {', '.join(kinds)} ({exc})"
        ) from None


def namespace(name: str):
    """Return the namespace for a backend name: ``numpy``, ``cupy`` or ``array_api_strict``.

    This is how user input (a ``--backend`` option) becomes a namespace; the
    library itself always takes the namespace from its input arrays.
    """
    if name not in _BACKENDS:
        raise ValueError(f"hicd: unknown backend {name!r}; choose one of {sorted(_BACKENDS)}")
    try:
        return importlib.import_module(_BACKENDS[name])
    except ImportError as exc:
        hint = " (install the 'gpu' extra: pip install hicd[gpu])" if name == "cupy" else ""
        raise ImportError(f"hicd: backend {name!r} is not available: {exc}{hint}") from None


def use_local_device(xp, local_rank: int):
    """On CuPy, make GPU ``local_rank mod (GPUs on this node)`` current for this process (data-parallel
    ranks of one node each take their own GPU); returns its index, or None on a host namespace."""
    if not is_cupy_namespace(xp):
        return None
    import cupy

    index = int(local_rank) % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(index).use()
    return index


def available_backends() -> list[str]:
    """Names of the backends that import here; ``cupy`` only when a GPU is usable."""
    names = []
    for name in _BACKENDS:
        try:
            xp = namespace(name)
            if name == "cupy":
                xp.zeros(1)  # raises without a driver / device
        except Exception:  # noqa: BLE001 - any failure means "not available here"
            continue
        names.append(name)
    return names


def is_numpy_namespace(xp) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_cupy_namespace(xp) -> bool:
    return array_api_compat.is_cupy_namespace(xp)


def mutable_namespace(xp) -> bool:
    """Whether arrays a function allocated itself may be updated in place.

    True for NumPy and CuPy, which have no autograd and no tracers. Elsewhere (torch,
    whose autograd may hold an intermediate; JAX, whose arrays are immutable) the
    library's own code rebinds instead (``a = a - b``), so the result dtype and the
    autograd graph are the same as with any other out-of-place code.
    """
    return is_numpy_namespace(xp) or is_cupy_namespace(xp)


def is_tracing(*arrays) -> bool:
    """True when a value cannot be read on the host now: a JAX tracer (``jit``, ``grad``,
    ``vmap``), a torch tensor while ``torch.compile`` traces, or a functorch-batched
    tensor (``torch.func.vmap``). Neither library is imported here; only a library the
    caller already imported is asked."""
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(a, jax.core.Tracer) for a in arrays):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(a, torch.Tensor) for a in arrays):
        if torch.compiler.is_compiling():
            return True
        batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
        if batched is not None and any(isinstance(a, torch.Tensor) and batched(a) for a in arrays):
            return True
    return False


def as_arrays(*objects):
    """``(xp, arrays)``: the namespace of the array-API arrays among ``objects``, and every
    object as an array of it; an object that only speaks DLPack (``__dlpack__``) is
    converted with ``xp.from_dlpack`` (into NumPy when no object is an array-API array).
    ``None`` entries stay None."""
    known = [o for o in objects if o is not None and array_api_compat.is_array_api_obj(o)]
    xp = array_namespace(*known) if known else array_api_compat.array_namespace(np.empty(0))
    out = []
    for o in objects:
        if o is None or array_api_compat.is_array_api_obj(o):
            out.append(o)
        elif hasattr(o, "__dlpack__"):
            out.append(xp.from_dlpack(o))
        else:
            raise TypeError(f"hicd: expected an array (array-API or DLPack), got {type(o).__module__}."
                            f"{type(o).__qualname__}")
    return xp, out


def to_host(x) -> np.ndarray:
    """Copy an array of any supported namespace to a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    if np.isscalar(x):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(x)


def contiguous_host(x) -> np.ndarray:
    """``x`` (an array of any supported namespace, or host numbers) as a C-contiguous NumPy array:
    a buffer that MPI can send (``hicd_core.parallel``)."""
    return np.ascontiguousarray(to_host(x))


def self_product_operand(x, xp):
    """``xp.matrix_transpose(x)`` as the right operand of ``x @ x^T``.

    On NumPy a C-ordered copy: NumPy sends a product of a matrix with its own transposed
    view to BLAS ``syrk``, which at the sizes of the correlations (64 x 16 to 64 x 128
    per window) is several times slower than the ``gemm`` a separate operand gets; the
    values were the same in every case compared (docs/perf/HISTORY.md). Elsewhere the view.
    """
    t = xp.matrix_transpose(x)
    return np.ascontiguousarray(t) if is_numpy_namespace(xp) else t


def host_empty(shape, dtype) -> np.ndarray:
    """An uninitialised NumPy array, e.g. the receive buffer of a collective."""
    return np.empty(shape, dtype=dtype)


def from_host(a, xp, *, dtype=None, device=None):
    """Move a host (NumPy) array into namespace ``xp`` (a copy on GPU backends).

    ``dtype`` may be given as a NumPy dtype or name; it is mapped to ``xp``'s own.
    """
    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(np.dtype(dtype), copy=False)
    target = getattr(xp, a.dtype.name)
    if device is None:
        return xp.asarray(a, dtype=target)
    return xp.asarray(a, dtype=target, device=device)


def all_finite(*arrays) -> bool:
    """True when every element of every array is finite (one host sync in total)."""
    xp = array_namespace(*arrays)
    flags = [xp.all(xp.isfinite(a)) for a in arrays]
    return bool(xp.all(xp.stack(flags))) if len(flags) > 1 else bool(flags[0])


def device(x):
    """The device an array lives on (array-API ``device``)."""
    return array_api_compat.device(x)


def host_rng(seed):
    """A seeded host ``numpy.random.Generator`` (PCG64): the one source of weight randomness."""
    return np.random.default_rng(seed)


def normal(rng, shape, std, xp, *, dtype="float32", device=None):
    """Draw ``N(0, std^2)`` on the host from ``rng`` and move it to ``xp``.

    Drawing on the host in float64 and casting makes NumPy and CuPy runs start
    from identical weights for the same seed.
    """
    return from_host(rng.standard_normal(shape) * std, xp, dtype=dtype, device=device)


# --------------------------------------------------------------------------- host performance helpers

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def keep_host_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 32) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A NumPy training step allocates and frees the same large arrays (activations,
    padded copies, im2col matrices) every step. By default glibc serves large
    allocations (above a threshold that adapts up to 32 MB) with fresh ``mmap``
    pages and unmaps them on free, so every step pays a page fault per 4 KiB
    touched (docs/PERFORMANCE.md has the measured cost). Raising the mmap and trim thresholds lets the heap keep
    (at most) the step's peak memory. This changes the whole process's allocator,
    so the library never calls it on its own; the example scripts, the CLI and the
    benchmarks do. Setting the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` does the same.

    Returns True if applied, False where the C library has no ``mallopt`` (not glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    clamp = lambda v: min(int(v), 2**31 - 1)  # noqa: E731  (an int parameter)
    return bool(mallopt(_M_MMAP_THRESHOLD, clamp(mmap_threshold)) and mallopt(_M_TRIM_THRESHOLD, clamp(trim_threshold)))


# --------------------------------------------------------------------------- host threads


class _HostPool:
    """The thread pool of ``run_independent`` and a handle on the BLAS libraries, made on first
    use and again in a forked child (which inherits the object but not its threads)."""

    def __init__(self):
        self.pid, self.size, self.executor, self.blas = None, 0, None, None
        self.inside = threading.local()  # set in the pool's threads: a job's own jobs run in order

    def get(self, size):
        if self.pid != os.getpid() or self.size != size:
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import ThreadpoolController

            if self.executor is not None and self.pid == os.getpid():
                self.executor.shutdown(wait=False)
            self.executor = ThreadPoolExecutor(size, thread_name_prefix="hicd", initializer=self._mark)
            self.blas, self.pid, self.size = ThreadpoolController(), os.getpid(), size
        return self.executor, self.blas

    def _mark(self):
        self.inside.active = True


_POOL = _HostPool()


def _threadpoolctl_available() -> bool:
    return importlib.util.find_spec("threadpoolctl") is not None


def run_independent(jobs, xp, threads=1, costs=None):
    """The results of the zero-argument callables ``jobs``, in order.

    With ``threads > 1`` on NumPy the jobs run on a pool of that many host threads, BLAS
    limited to one thread meanwhile through threadpoolctl (the ``cpu`` extra; an
    ``ImportError`` says so when it is missing): NumPy releases the GIL inside its kernels,
    so independent array work fills cores that its one-at-a-time elementwise kernels leave
    idle, and BLAS's own threads would compete for them. The largest ``costs`` start first.
    Otherwise (one thread, CuPy, torch, JAX, array-api-strict, inside a job) they run one
    after another. Either way each job computes the same values; jobs must not talk to other
    processes (their order is not fixed). The first exception of a job, in job order, is
    raised once all finished.
    """
    jobs = list(jobs)
    if threads < 2 or len(jobs) < 2 or not is_numpy_namespace(xp) or getattr(_POOL.inside, "active", False):
        return [job() for job in jobs]
    if not _threadpoolctl_available():
        raise ImportError(f"threads={threads} needs threadpoolctl: pip install 'hicd[cpu]' (or threads=1)")
    from concurrent.futures import wait

    order = sorted(range(len(jobs)), key=lambda i: -costs[i]) if costs is not None else range(len(jobs))
    executor, blas = _POOL.get(threads)
    with blas.limit(limits=1, user_api="blas"):
        futures = {i: executor.submit(jobs[i]) for i in order}
        wait(futures.values())
    return [futures[i].result() for i in range(len(jobs))]


_CONV_THREADS = 1  # set by conv_threads(): the host threads of the "flat" convolutions' image blocks


def conv_thread_count() -> int:
    """The host threads the convolutions' image blocks run on now (1 outside ``conv_threads``)."""
    return _CONV_THREADS


@contextlib.contextmanager
def conv_threads(threads):
    """Within the block, NumPy's convolutions, BatchNorm and ReLU run their images on ``threads`` host threads.

    The "flat" and "phases" convolutions of ``hicd_core.conv_layouts`` already work through
    the batch in blocks of images; with ``threads > 1`` the blocks become jobs of
    ``run_independent`` (a batch of one block is cut into ``threads``), and BLAS is held at
    one thread for the whole block (threadpoolctl, the ``cpu`` extra): the images' products
    and window copies then run side by side, where OpenBLAS's own threads split each small
    per-image product and leave NumPy's copies on one core (docs/PERFORMANCE.md). Each image's
    output is computed as before; a weight gradient is summed over more blocks, so results
    move by float32 rounding against one thread (the same for the same count). ``threads=1``
    changes nothing. CuPy and the other namespaces ignore it. Not for use from several
    threads at once (it sets a process-wide count).
    """
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    global _CONV_THREADS
    threads = int(threads)
    if threads == 1:
        previous, _CONV_THREADS = _CONV_THREADS, 1
        try:
            yield
        finally:
            _CONV_THREADS = previous
        return
    if not _threadpoolctl_available():
        raise ImportError(f"threads={threads} needs threadpoolctl: pip install 'hicd[cpu]' (or threads=1)")
    _, blas = _POOL.get(threads)
    previous, _CONV_THREADS = _CONV_THREADS, threads
    try:
        with blas.limit(limits=1, user_api="blas"):
            yield
    finally:
        _CONV_THREADS = previous


# --------------------------------------------------------------------------- NCCL (the device half of data parallelism)

NCCL_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES


def nccl_available() -> bool:
    """Whether CuPy here was built with NCCL (``cupy.cuda.nccl_enabled``); False without CuPy."""
    try:
        import cupy
    except ImportError:
        return False
    return bool(getattr(cupy.cuda, "nccl_enabled", False))


def nccl_unique_id() -> tuple:
    """A new NCCL id (``NCCL_ID_BYTES`` chars as ints), made by one rank and shared with the others."""
    from cupy.cuda import nccl

    return tuple(nccl.get_unique_id())


class NCCLComm:
    """A NCCL communicator over CuPy arrays, queued on the current stream (``hicd_core.parallel``
    adds the waiting, the timeout and the errors).

    ``allreduce_sum(x)`` and ``allgather(x)`` return ``(out, event)``: the result (for the
    gather, the ranks' arrays stacked on a new leading axis) and the event recorded after the
    collective; ``poll()`` raises ``RuntimeError`` with NCCL's message on an asynchronous error;
    ``abort()`` releases the communicator.
    """

    _TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "int32": "NCCL_INT32", "int64": "NCCL_INT64"}

    def __init__(self, size, uid, rank):
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl, self.size = cupy, nccl, size
        self.comm = nccl.NcclCommunicator(size, uid, rank)

    def _type(self, x):
        name = self._TYPES.get(str(x.dtype))
        if name is None:
            raise TypeError(f"NCCL transport: no NCCL type for dtype {x.dtype} (supported: {sorted(self._TYPES)})")
        return getattr(self.nccl, name)

    def allreduce_sum(self, x):
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty_like(x)
        stream = self.cupy.cuda.get_current_stream()
        self.comm.allReduce(x.data.ptr, out.data.ptr, x.size, self._type(x), self.nccl.NCCL_SUM, stream.ptr)
        return out, stream.record()

    def allgather(self, x):
        x = self.cupy.ascontiguousarray(x)
        out = self.cupy.empty((self.size, *x.shape), dtype=x.dtype)
        stream = self.cupy.cuda.get_current_stream()
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self._type(x), stream.ptr)
        return out, stream.record()

    def poll(self):
        try:
            self.comm.check_async_error()
        except self.nccl.NcclError as exc:
            raise RuntimeError(str(exc)) from None

    def abort(self):
        try:
            self.comm.abort()
        except Exception:  # noqa: BLE001 - already broken: nothing more to release
            pass
