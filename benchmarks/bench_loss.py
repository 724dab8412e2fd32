"""Benchmark: ``hicd_loss`` forward + backward at the default training sizes.

Times the hand-derived HiCD loss (float32; batch 8; semantic stages 32x32x32
window 8, 64x16x16 window 8, 128x8x8 window None; change features 16x64x64
window 8) and prints one JSON line with the median milliseconds. When PyTorch is
installed (it is never a dependency of hicd_core) it also times the same loss
written with torch autograd on the same device and thread count, checks that the
two agree, and prints the ratio ``median_ms / torch_median_ms`` (< 1: faster). Ours runs
with ``hicd_loss(..., threads=)`` set to the thread count the twin gets (``--threads``;
default ``OMP_NUM_THREADS``, else the CPU count; 1 off NumPy or without threadpoolctl, the
``cpu`` extra); with more than one, the serial loss (``threads=1``, what the training loop
uses) is timed too, as ``serial_median_ms``. With
``--interleave`` ours and the twin are timed in alternating blocks of five calls (ours,
twin, ours, ...), so that both see the same phases of a noisy machine; ``median_ms`` then
comes from those blocks.

    python benchmarks/bench_loss.py                      # NumPy on the CPU
    python benchmarks/bench_loss.py --backend cupy       # CuPy, torch on CUDA
    python benchmarks/bench_loss.py --no-torch --repeats 50
    python benchmarks/bench_loss.py --interleave         # ours and the twin in alternating blocks
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core import backend, hicd_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_sync, interleaved_ms, median_ms, torch_sync  # noqa: E402

SEM_SHAPES = [(32, 32), (64, 16), (128, 8)]  # (channels, side) of E2, E3, E4 at input 64x64
SEM_WINDOWS = [8, 8, None]
CHG_CHANNELS, CHG_SIDE, CHG_WINDOW = 16, 64, 8


def make_inputs(batch, seed=0):
    """Host float32 features: student and teacher, semantic pairs and change features."""
    rng = np.random.default_rng(seed)
    draw = lambda c, s: rng.standard_normal((batch, c, s, s)).astype(np.float32)  # noqa: E731
    s_sem = [(draw(c, s), draw(c, s)) for c, s in SEM_SHAPES]
    t_sem = [(draw(c, s), draw(c, s)) for c, s in SEM_SHAPES]
    return s_sem, t_sem, draw(CHG_CHANNELS, CHG_SIDE), draw(CHG_CHANNELS, CHG_SIDE)


def torch_hicd_loss(torch, s_sem, t_sem, c_s, c_t, windows, change_window, tau=0.5, eps=1e-6):
    """The same SPEC section 2 loss in PyTorch (all weights 1, kind "kl"), for autograd."""

    def windows_of(f, w):
        N, C, H, W = f.shape
        if w is None:
            x = f.reshape(N, 1, C, H * W).transpose(2, 3)
        else:
            x = f.reshape(N, C, H // w, w, W // w, w).permute(0, 2, 4, 3, 5, 1).reshape(N, -1, w * w, C)
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)

    def global_of(f):
        g = f.mean(dim=(2, 3))
        g = g / torch.sqrt((g * g).sum(-1, keepdim=True) + eps)
        return g @ g.T

    def dist(rs, rt):
        rows = rs.numel() // rs.shape[-1]
        log_p = torch.log_softmax(rt / tau, -1)
        log_q = torch.log_softmax(rs / tau, -1)
        return tau * tau / rows * (log_p.exp() * (log_p - log_q)).sum()

    def gram(a, b):
        return a @ b.transpose(-1, -2)

    total = 0.0
    for (s1, s2), (t1, t2), w in zip(s_sem, t_sem, windows):
        x1, x2, y1, y2 = (windows_of(f, w) for f in (s1, s2, t1, t2))
        total = total + (dist(gram(x1, x1), gram(y1, y1)) + dist(gram(x2, x2), gram(y2, y2))) / 2
        total = total + dist(gram(x1, x2), gram(y1, y2))
        total = total + dist(global_of(torch.cat([s1, s2])), global_of(torch.cat([t1, t2])))
    x, y = windows_of(c_s, change_window), windows_of(c_t, change_window)
    total = total + dist(gram(x, x), gram(y, y))
    return total + dist(global_of(c_s), global_of(c_t))


def default_threads(backend_name):
    """The twin's thread count for ours on NumPy (``OMP_NUM_THREADS``, else the CPU count); 1 on
    other backends, which ignore ``threads``, and where threadpoolctl (the ``cpu`` extra) is missing."""
    if backend_name != "numpy" or importlib.util.find_spec("threadpoolctl") is None:
        return 1
    return int(os.environ.get("OMP_NUM_THREADS", "") or os.cpu_count() or 1)


def _torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "array_api_strict"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch autograd comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="hicd_loss(threads=); default: OMP_NUM_THREADS, else the CPU count (NumPy only)")
    parser.add_argument("--interleave", action="store_true",
                        help="time ours and the torch twin in alternating blocks of calls")
    args = parser.parse_args(argv)
    backend.keep_host_memory()

    xp = backend.namespace(args.backend)
    on_gpu = backend.is_cupy_namespace(xp)
    sync = device_sync(xp)

    host = make_inputs(args.batch)
    s_sem = [tuple(backend.from_host(a, xp) for a in pair) for pair in host[0]]
    t_sem = [tuple(backend.from_host(a, xp) for a in pair) for pair in host[1]]
    c_s, c_t = backend.from_host(host[2], xp), backend.from_host(host[3], xp)
    threads = args.threads or default_threads(args.backend)
    kw = dict(windows=SEM_WINDOWS, change_window=CHG_WINDOW)
    run = lambda: hicd_loss(s_sem, t_sem, c_s, c_t, threads=threads, **kw)  # noqa: E731
    torch = None if args.no_torch else _torch_or_none()
    # interleaved, ours is timed in the blocks beside the twin (below), not on its own first
    ours_ms = None if args.interleave and torch is not None else median_ms(run, sync, args.repeats, warmup=3)[0]
    loss = float(run()[0])
    result = {
        "bench": "hicd_loss forward+backward",
        "backend": args.backend,
        "dtype": "float32",
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": threads,
        "median_ms": None if ours_ms is None else round(ours_ms, 3),
        "loss": loss,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }

    if threads > 1:
        serial_ms, _ = median_ms(lambda: hicd_loss(s_sem, t_sem, c_s, c_t, **kw), sync, args.repeats, warmup=3)
        result["serial_median_ms"] = round(serial_ms, 3)

    if not args.no_torch:
        if torch is None:
            result["torch"] = "not installed"
        else:
            device = "cuda" if on_gpu else "cpu"
            tt = lambda a: torch.as_tensor(a, device=device).requires_grad_(True)  # noqa: E731
            ts_sem = [tuple(tt(a) for a in pair) for pair in host[0]]
            tt_sem = [tuple(torch.as_tensor(a, device=device) for a in pair) for pair in host[1]]
            tc_s, tc_t = tt(host[2]), torch.as_tensor(host[3], device=device)
            leaves = [a for pair in ts_sem for a in pair] + [tc_s]

            def torch_step():
                for leaf in leaves:
                    leaf.grad = None
                out = torch_hicd_loss(torch, ts_sem, tt_sem, tc_s, tc_t, SEM_WINDOWS, CHG_WINDOW)
                out.backward()
                return out

            tsync = torch_sync(torch, device)
            if args.interleave:
                torch_step()  # warm-up
                (ours_ms, _), (torch_ms, _) = interleaved_ms([run, torch_step], [sync, tsync], args.repeats)
                result.update(median_ms=round(ours_ms, 3), interleaved=True)
            else:
                torch_ms, _ = median_ms(torch_step, tsync, args.repeats, warmup=3)
            torch_loss = float(torch_step().detach())
            ours = run()[1]
            grad_err = float(np.max(np.abs(backend.to_host(ours["chg"]) - tc_s.grad.cpu().numpy())))
            result.update(
                torch_version=torch.__version__,
                torch_device=device,
                torch_threads=torch.get_num_threads(),
                torch_median_ms=round(torch_ms, 3),
                ratio=round(ours_ms / torch_ms, 3),
                loss_abs_diff=abs(loss - torch_loss),
                chg_grad_max_abs_diff=grad_err,
            )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
