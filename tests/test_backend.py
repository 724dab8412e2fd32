"""The backend shim: namespace lookup, transfers, and the rule that only it imports NumPy."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

import hicd_core
from hicd_core import backend
from tests.conftest import to_np, to_xp

PACKAGE = Path(hicd_core.__file__).parent
# Host-side modules that may use NumPy directly (SPEC/STYLE: backend, io, data/).
HOST_SIDE = {"backend.py", "io.py"}
ARRAY_LIBS = {"numpy", "cupy", "cupyx", "array_api_strict", "torch", "jax", "jaxlib"}
# The optional adapters import their own framework and nothing else may (hicd_core never loads them).
ADAPTERS = {"torch.py": {"torch"}, "jax.py": {"jax"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_host_side_modules_import_array_libraries():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "data" or rel.name in HOST_SIDE:
            continue
        bad = imported_roots(path) & ARRAY_LIBS - ADAPTERS.get(str(rel), set())
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert not offenders, f"array libraries imported outside the backend shim: {offenders}"


def test_torch_and_jax_are_imported_only_by_their_adapters():
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        assert not imported_roots(path) & ({"torch", "jax"} - ADAPTERS.get(rel, set())), path
    assert "import hicd_core.torch" not in (PACKAGE / "__init__.py").read_text()


def test_round_trip_keeps_values_and_dtype(xp):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = to_xp(xp, a)
    assert backend.array_namespace(x).__name__ == xp.__name__
    assert x.dtype == xp.float32
    back = to_np(x)
    assert back.dtype == np.float32 and np.array_equal(back, a)


def test_mixed_namespaces_raise_with_the_types():
    xs = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="one array-API namespace.*array_api_strict.*numpy"):
        backend.array_namespace(np.ones(2), xs.ones(2))
    with pytest.raises(TypeError, match="one array-API namespace"):
        backend.array_namespace(np.ones(2), [1.0, 2.0])


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        backend.namespace("jax")


def test_all_finite(xp):
    assert backend.all_finite(to_xp(xp, np.ones(3)), to_xp(xp, np.zeros(2)))
    assert not backend.all_finite(to_xp(xp, np.array([1.0, np.inf])))


def test_keep_host_memory_applies_on_glibc():
    """mallopt accepts the thresholds where the C library is glibc; elsewhere the call is a no-op."""
    import platform

    applied = backend.keep_host_memory()
    assert isinstance(applied, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied


# --------------------------------------------------------------------------- run_independent

@pytest.fixture
def threadpoolctl():
    return pytest.importorskip("threadpoolctl", reason="the cpu extra (threadpoolctl) is not installed")


def test_run_independent_keeps_the_order_and_starts_the_costliest_first(monkeypatch, threadpoolctl):
    import threading
    import time

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    started, lock = [], threading.Lock()

    def job(i):
        def run():
            with lock:
                started.append(i)
            time.sleep(0.01)
            return i * i
        return run

    out = backend.run_independent([job(i) for i in range(5)], backend.namespace("numpy"), costs=[1, 5, 2, 9, 3])
    assert out == [0, 1, 4, 9, 16]
    assert set(started[:2]) == {3, 1}  # the two costliest first, on the two threads


def test_run_independent_limits_blas_meanwhile_and_restores_it(monkeypatch, threadpoolctl):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    controller = threadpoolctl.ThreadpoolController()
    blas = [lib for lib in controller.info() if lib["user_api"] == "blas"]
    if not blas:
        pytest.skip("no BLAS library that threadpoolctl can see")
    before = [lib["num_threads"] for lib in blas]
    inside = backend.run_independent(
        [lambda: [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]] * 2,
        backend.namespace("numpy"))
    assert inside == [[1] * len(blas)] * 2
    assert [lib["num_threads"] for lib in threadpoolctl.ThreadpoolController().info()
            if lib["user_api"] == "blas"] == before


def test_run_independent_raises_the_first_failure_after_all_jobs_ran(monkeypatch, threadpoolctl):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    done = []

    def fail(msg):
        def run():
            raise ValueError(msg)
        return run

    with pytest.raises(ValueError, match="first"):
        backend.run_independent([fail("first"), lambda: done.append(1), fail("second")], backend.namespace("numpy"))
    assert done == [1]


def test_run_independent_runs_nested_jobs_and_other_namespaces_serially(monkeypatch, threadpoolctl):
    import threading

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    main = threading.get_ident()
    xp = backend.namespace("numpy")
    inner = lambda: backend.run_independent([threading.get_ident] * 2, xp)  # noqa: E731
    for outer_thread, inner_threads in backend.run_independent([lambda: (threading.get_ident(), inner())] * 2, xp):
        assert inner_threads == [outer_thread, outer_thread]
    strict = pytest.importorskip("array_api_strict")
    assert backend.run_independent([threading.get_ident] * 2, strict) == [main, main]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert backend.run_independent([threading.get_ident] * 2, xp) == [main, main]


def test_host_threads_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert backend.host_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert backend.host_threads() >= 1
