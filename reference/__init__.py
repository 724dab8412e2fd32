"""Independent float64 NumPy reference implementations, used only by the tests.

Written straight from ``SPEC.md`` with explicit loops; never imports ``hicd_core``.
"""
