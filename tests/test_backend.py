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


def package_imports(path: Path) -> set[str]:
    """The hicd_core modules a module imports, at its top or inside functions, as dotted names below the package."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    here = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here[: len(here) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            names = [target + [a.name] for a in node.names] if not node.module else [target]
            for parts in names:  # "from . import x" names a module; "from .m import f" the module m
                module = ".".join(parts)
                if (PACKAGE / Path(*parts)).with_suffix(".py").exists() or (PACKAGE / Path(*parts)).is_dir():
                    found.add(module)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hicd_core."):
            found.add(node.module.removeprefix("hicd_core."))
    return {m.removesuffix(".__init__") for m in found}


def test_the_package_has_no_import_cycles():
    """No module imports, even lazily, a module that imports it back (directly or through others)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = package_imports(path) - {name}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, set())):
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        on_stack.discard(node)
        stack.pop()
        done.add(node)

    done = set()
    for node in sorted(graph):
        if node not in done:
            visit(node, [], set(), done)
    # a package's __init__ re-exporting its modules is no cycle of the modules themselves
    cycles = [c for c in cycles if not any(m in ("", "data") for m in c)]
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


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


def test_run_independent_keeps_the_order_and_uses_the_pool():
    pytest.importorskip("threadpoolctl")
    import threading

    xp = backend.namespace("numpy")
    where = lambda i: (i, threading.current_thread().name)  # noqa: E731
    jobs = [lambda i=i: where(i) for i in range(5)]
    results = backend.run_independent(jobs, xp, threads=2, costs=[1, 5, 2, 4, 3])
    assert [i for i, _ in results] == list(range(5))
    assert all(name.startswith("hicd") for _, name in results)  # on the pool's threads
    assert all(name == threading.current_thread().name for _, name in backend.run_independent(jobs, xp, threads=1))
    # a job's own jobs run in order on its thread (no pool inside the pool)
    nested = backend.run_independent([lambda: backend.run_independent(jobs[:2], xp, threads=2)] * 2, xp, threads=2)
    assert all(len({name for _, name in inner}) == 1 for inner in nested)


def test_run_independent_raises_the_first_failure_in_job_order():
    pytest.importorskip("threadpoolctl")
    xp = backend.namespace("numpy")

    def fail(message):
        raise RuntimeError(message)

    jobs = [lambda: 1, lambda: fail("second"), lambda: fail("third")]
    for threads in (1, 2):
        with pytest.raises(RuntimeError, match="second"):
            backend.run_independent(jobs, xp, threads=threads)


def test_run_independent_on_threads_without_threadpoolctl_says_what_to_install(monkeypatch):
    xp = backend.namespace("numpy")
    monkeypatch.setattr(backend, "_threadpoolctl_available", lambda: False)
    with pytest.raises(ImportError, match=r"threads=2 needs threadpoolctl: pip install 'hicd\[cpu\]'"):
        backend.run_independent([lambda: 1, lambda: 2], xp, threads=2)
    assert backend.run_independent([lambda: 1, lambda: 2], xp, threads=1) == [1, 2]
