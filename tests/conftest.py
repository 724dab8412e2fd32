"""Shared fixtures: the ``xp`` backend fixture and strict assertion helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from hicd_core import backend

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["numpy", "array_api_strict", "cupy"]
_AVAILABLE = backend.available_backends()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LEVIR_SAMPLES = SHARED / "data" / "levir-cd-samples"
SZTAKI = SHARED / "data" / "sztaki-airchange"


@pytest.fixture(params=BACKENDS, scope="session")
def xp(request):
    """Namespace of each backend available here; CuPy is skipped without a GPU."""
    name = request.param
    if name not in _AVAILABLE:
        pytest.skip(f"backend {name} not available")
    return backend.namespace(name)


def to_xp(xp, a, dtype=None):
    return backend.from_host(np.asarray(a), xp, dtype=dtype)


def to_np(x):
    return np.asarray(backend.to_host(x))


def assert_close(actual, expected, xp, *, rtol=1e-10, atol=1e-12, dtype=None):
    """Check namespace, dtype and shape first, then values (scipy's _lib style)."""
    actual_xp = backend.array_namespace(actual)
    assert actual_xp.__name__ == xp.__name__, f"namespace {actual_xp.__name__} != {xp.__name__}"
    if dtype is not None:
        assert actual.dtype == getattr(xp, np.dtype(dtype).name), f"dtype {actual.dtype} != {dtype}"
    expected = np.asarray(expected)
    assert tuple(actual.shape) == expected.shape, f"shape {tuple(actual.shape)} != {expected.shape}"
    np.testing.assert_allclose(to_np(actual), expected, rtol=rtol, atol=atol)
