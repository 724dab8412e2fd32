"""Probe (issue 27): FC-Siam-diff's CPU step with the "flat" convolutions' image blocks run on a
pool of two Python threads and OpenBLAS at one thread, against the library as it is.

    OMP_NUM_THREADS=1 POOL=1 python docs/perf/thread_pool_probe.py   # the pool, BLAS single-threaded
    OMP_NUM_THREADS=1 python docs/perf/thread_pool_probe.py          # the library, one thread
    OMP_NUM_THREADS=2 python docs/perf/thread_pool_probe.py          # the library, OpenBLAS on two threads

Replaces ``conv_layouts._flat_conv`` and ``flat_backward`` in this process only (a batch of one
block is cut in two so that both threads work); prints the median of 6 training steps, batch 8,
128², dropout 0. Not part of the library: results in ``thread_pool_probe.txt``.
"""
import sys, os, time
sys.path.insert(0, '/work/main'); sys.path.insert(0, '/work/main/benchmarks')
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from hicd_core import backend
import hicd_core.conv_layouts as CL
from hicd_core.networks import build_model
from hicd_core.model import DEFAULT_WIDTHS
from hicd_core.optim import AdamW
from hicd_core.train import train_step
import bench
POOL = ThreadPoolExecutor(2) if os.environ.get('POOL') else None

def _flat_conv(flat, weight, bias, Ho, Wo, Wp, *, xp):
    N, C, P = flat.shape
    O, _, k, _ = weight.shape
    L = Ho * Wp
    itemsize = 4
    pf = CL.flat_product_first(C, O)
    if pf:
        wk = xp.reshape(xp.permute_dims(weight, (2, 3, 0, 1)), (k * k * O, C)); image_bytes = k * k * O * P * itemsize
    else:
        w2 = xp.reshape(weight, (O, C * k * k)); image_bytes = C * k * k * L * itemsize
    blocks = CL._blocks(N, image_bytes, xp=xp)
    if len(blocks) < 2 and N >= 2:
        blocks = [(0, N // 2), (N // 2, N)]
    y = xp.empty((N, O, Ho, Wo), dtype=flat.dtype)
    def one(se):
        s, e = se
        if pf:
            z = xp.reshape(xp.matmul(wk, flat[s:e, ...]), (e - s, k * k, O, P))
            prod = z[:, 0, :, :L] + z[:, 1, :, 1 : 1 + L]
            for i in range(k):
                for j in range(k):
                    if i * k + j > 1:
                        prod += z[:, i * k + j, :, i * Wp + j : i * Wp + j + L]
        else:
            prod = xp.matmul(w2, CL._flat_im2col(flat[s:e, ...], k, Wp, L, xp=xp))
        CL._flat_unpad_into(y, s, e, prod, Wp, bias, xp=xp)
    list(POOL.map(one, blocks))
    return y

def flat_backward(dy, cache, input_grad, dbias, *, xp):
    N, O, Ho, Wo = dy.shape
    _, C, k, _ = cache.weight.shape
    H, W = cache.x_shape[2:]
    Wp, L, q = CL.flat_grid(cache)
    itemsize = 4
    dyflat = CL.flat_padded(dy, cache.padding, xp=xp)
    if not input_grad and C < O:
        return orig_bw(dy, cache, input_grad, dbias, xp=xp)
    xg = cache.padded[:, :, q : q + L]
    wt = CL.flipped_taps(cache.weight, xp=xp)
    blocks = CL._blocks(N, O * k * k * L * itemsize, xp=xp)
    if len(blocks) < 2 and N >= 2:
        blocks = [(0, N // 2), (N // 2, N)]
    dx = xp.empty(cache.x_shape, dtype=dy.dtype) if input_grad else None
    def one(se):
        s, e = se
        dcols = CL._flat_im2col(dyflat[s:e, ...], k, Wp, L, xp=xp)
        part = xp.sum(xp.matmul(dcols, xp.matrix_transpose(xg[s:e, ...])), axis=0)
        if input_grad:
            CL._flat_unpad_into(dx, s, e, xp.matmul(wt, dcols), Wp, None, xp=xp)
        return part
    parts = list(POOL.map(one, blocks))
    g = parts[0]
    for p in parts[1:]: g = g + p
    return dx, CL.unflipped_weight_grad(g, cache.weight.shape, xp=xp), dbias

orig_bw = CL.flat_backward
if POOL:
    CL._flat_conv = _flat_conv; CL.flat_backward = flat_backward; CL.BACKWARD["flat"] = flat_backward
backend.keep_host_memory()
xp = backend.namespace('numpy')
x1, x2, x2hq, lab = bench.make_batch(8, 128)
m = build_model('fc-siam-diff', DEFAULT_WIDTHS, xp=xp, seed=0, dropout=0.0)
opt = AdamW(m.params, lr=1e-3, weight_decay=1e-2)
step = lambda: train_step(m, opt, x1, x2, lab)
step(); step()
ts = []
for _ in range(6):
    s = time.perf_counter(); step(); ts.append(time.perf_counter() - s)
print('OMP', os.environ.get('OMP_NUM_THREADS'), 'pool', bool(POOL), 'median ms', round(1e3 * sorted(ts)[3]))
