"""Probe (2026-12-03): one block of 32 windows of 64 pixels, 16 channels, as in ``hicd_loss``'s
change-feature windows. Times the self-Gram product with the transposed view (NumPy sends
``X @ X^T`` to BLAS syrk) and with a contiguous copy (gemm), the cross product, and the softmax's
row scaling as a broadcast multiply and as ``einsum``; prints medians in microseconds.

    OMP_NUM_THREADS=1 python docs/perf/gram_syrk_probe.py
"""

import time

import numpy as np


def median_us(f, n=300):
    for _ in range(20):
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e6, 1)


def main():
    rng = np.random.default_rng(1)
    X, Y = (rng.standard_normal((32, 64, 16)).astype(np.float32) for _ in range(2))
    P = np.exp(rng.standard_normal((32, 64, 64)).astype(np.float32))
    inv = (1 / P.sum(-1, keepdims=True)).astype(np.float32)
    same = np.array_equal(np.matmul(X, np.swapaxes(X, -1, -2)), np.matmul(X, np.ascontiguousarray(np.swapaxes(X, -1, -2))))
    print({"self, transposed view (syrk)": median_us(lambda: np.matmul(X, np.swapaxes(X, -1, -2))),
           "self, contiguous copy (gemm)": median_us(lambda: np.matmul(X, np.ascontiguousarray(np.swapaxes(X, -1, -2)))),
           "cross, transposed view": median_us(lambda: np.matmul(X, np.swapaxes(Y, -1, -2))),
           "row scaling, broadcast": median_us(lambda: P * inv),
           "row scaling, einsum": median_us(lambda: np.einsum("bij,bi->bij", P, inv[..., 0])),
           "self products equal": same})


if __name__ == "__main__":
    main()
