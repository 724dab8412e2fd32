"""Benchmark: one full training step of a network (forward, backward, optimizer).

    python benchmarks/bench.py --backend numpy --batch 8 --size 64 --steps 20 --mode task --json
    python benchmarks/bench.py --mode hicd --vs-torch          # also time a PyTorch eager twin
    python benchmarks/bench.py --mode hicd --profile           # where the time goes
    python benchmarks/bench.py --model fc-siam-diff --size 128 --vs-torch --interleave

``--model`` picks the network (``tiny-siam-cd``, the default, or ``fc-siam-diff``; each
has its twin here, with the same layers, dropout included, and no bias before BatchNorm).

``task``: student forward, BCE, backward, AdamW. ``hicd`` adds the frozen
teacher's forward on the high-quality pair and ``hicd_loss`` on SPEC section 4's
default taps (E2, E3, E4 with windows 8, 8, None; d1 with window 8), exactly as
``hicd_core.train.train_step`` does in training. Prints one JSON line with the
median step time in milliseconds and the peak memory of a step. ``--vs-torch``
times a PyTorch twin (same network, batch, thread count, float32) in the same
run and prints the ratio ``median_ms / torch_median_ms``; with ``--interleave`` the
two steps are timed in alternating blocks of five (ours, twin, ours, ...), so that both
see the same phases of a noisy machine, and ``median_ms`` comes from those blocks. The
twin lives here, never in ``hicd_core``. ``--threads N`` runs our convolutions' image blocks on
N host threads with BLAS at one thread during our step (``backend.conv_threads``, as
``TrainConfig(threads=N)`` trains); the twin keeps its own threads.
"""

from __future__ import annotations

import argparse
import cProfile
import io as _io
import json
import os
import platform
import pstats
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hicd_core import backend  # noqa: E402
from hicd_core.model import DEFAULT_WIDTHS  # noqa: E402
from hicd_core.networks import DEFAULT_MODEL, MODELS, build_model  # noqa: E402
from hicd_core.optim import AdamW  # noqa: E402
from hicd_core.train import DistillConfig, default_windows, train_step  # noqa: E402
from _timing import device_sync, interleaved_ms, median_ms, torch_sync  # noqa: E402


def make_batch(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.random((batch, 3, size, size), dtype=np.float32)
    x2 = rng.random((batch, 3, size, size), dtype=np.float32)
    x2_hq = rng.random((batch, 3, size, size), dtype=np.float32)
    label = (rng.random((batch, size, size)) > 0.8).astype(np.uint8)
    return x1, x2, x2_hq, label


# --------------------------------------------------------------------------- torch twin


def torch_twin(torch, widths):
    nn = torch.nn

    def cbr(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class TorchSiamCD(nn.Module):
        def __init__(self):
            super().__init__()
            w1, w2, w3, w4 = widths
            self.enc = nn.ModuleList(
                [nn.Sequential(cbr(3, w1), cbr(w1, w1))]
                + [nn.Sequential(cbr(widths[k - 1], widths[k], 2), cbr(widths[k], widths[k])) for k in (1, 2, 3)]
            )
            self.dec4, self.dec3 = cbr(w4, w3), cbr(2 * w3, w3)
            self.dec2, self.dec1 = cbr(w3 + w2, w2), cbr(w2 + w1, w1)
            self.head = nn.Conv2d(w1, 1, 1)

        def forward(self, x1, x2):
            n = x1.shape[0]
            h = torch.cat([x1, x2])  # encoder once on the stacked pair, as hicd_core does
            stages, deltas = [], []
            for block in self.enc:
                h = block(h)
                stages.append(h)
                deltas.append((h[:n] - h[n:]).abs())
            up = lambda t: nn.functional.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
            d = self.dec4(deltas[3])
            d = self.dec3(torch.cat([up(d), deltas[2]], 1))
            d = self.dec2(torch.cat([up(d), deltas[1]], 1))
            d = self.dec1(torch.cat([up(d), deltas[0]], 1))
            taps = {f"E{k + 1}": (s[:n], s[n:]) for k, s in enumerate(stages)}
            taps["d1"] = d
            return self.head(d), taps

    return TorchSiamCD


def torch_fc_twin(torch, widths, dropout=0.2):
    """FC-Siam-diff as ``hicd_core.fc_siam`` builds it: encoder once on the stacked pair, |a - b| skips and bottleneck."""
    nn = torch.nn
    depths = (2, 2, 3, 3)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Dropout2d(dropout))

    class TorchFCSiamDiff(nn.Module):
        def __init__(self):
            super().__init__()
            enc, cin = [], 3
            for w, depth in zip(widths, depths):
                enc.append(nn.Sequential(*[block(cin if i == 0 else w, w) for i in range(depth)]))
                cin = w
            self.enc = nn.ModuleList(enc)
            self.up = nn.ModuleList([nn.ConvTranspose2d(w, w, 3, 2, 1, output_padding=1) for w in widths])
            dec = []
            for k, w in enumerate(widths):
                depth = depths[k] if k > 0 else 1
                out = widths[max(k - 1, 0)]
                dec.append(nn.Sequential(*[block(2 * w if i == 0 else w, out if i == depth - 1 else w)
                                           for i in range(depth)]))
            self.dec = nn.ModuleList(dec)
            self.head = nn.Conv2d(widths[0], 1, 3, 1, 1)

        def forward(self, x1, x2):
            n = x1.shape[0]
            h = torch.cat([x1, x2])
            stages = []
            for k, stage in enumerate(self.enc):
                h = stage(h if k == 0 else nn.functional.max_pool2d(h, 2))
                stages.append(h)
            p = nn.functional.max_pool2d(h, 2)
            d = (p[:n] - p[n:]).abs()
            for k in (3, 2, 1, 0):
                s = stages[k]
                d = self.dec[k](torch.cat([self.up[k](d), (s[:n] - s[n:]).abs()], 1))
            taps = {f"E{k + 1}": (s[:n], s[n:]) for k, s in enumerate(stages)}
            taps["d1"] = d
            return self.head(d), taps

    return TorchFCSiamDiff


def torch_step(args, host_batch, windows, change_window):
    """``(torch, step, sync, device)`` of the PyTorch twin's training step, or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    from bench_loss import torch_hicd_loss

    device = "cuda" if args.backend == "cupy" else "cpu"
    if args.model == "fc-siam-diff":
        Twin = torch_fc_twin(torch, DEFAULT_WIDTHS, 0.2 if args.dropout is None else args.dropout)
    else:
        Twin = torch_twin(torch, DEFAULT_WIDTHS)
    student, teacher = Twin().to(device), Twin().to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-2)
    x1, x2, x2_hq, label = (torch.as_tensor(a, device=device) for a in host_batch)
    target = label.float()[:, None]

    def step():
        opt.zero_grad(set_to_none=True)
        logits, taps = student(x1, x2)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        if args.mode == "hicd":
            with torch.no_grad():
                _, t_taps = teacher(x1, x2_hq)
            loss = loss + torch_hicd_loss(
                torch, [taps[t] for t in ("E2", "E3", "E4")], [t_taps[t] for t in ("E2", "E3", "E4")],
                taps["d1"], t_taps["d1"], windows, change_window,
            )
        loss.backward()
        opt.step()

    return torch, step, torch_sync(torch, device), device


# --------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time one training step of a network.")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout rate of fc-siam-diff, ours and the twin (default 0.2, as published)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "array_api_strict"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="task", choices=["task", "hicd"])
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--vs-torch", action="store_true", help="also time the PyTorch eager twin")
    parser.add_argument("--interleave", action="store_true",
                        help="with --vs-torch: time ours and the twin in alternating blocks of steps")
    parser.add_argument("--profile", action="store_true", help="print the top functions of a profiled step")
    parser.add_argument("--threads", type=int, default=1,
                        help="host threads of our convolutions (backend.conv_threads: image blocks on a pool, "
                             "BLAS at one thread during our step; default 1: BLAS's own threads)")
    parser.add_argument("--conv-layout", default="auto", choices=["auto", "batched", "merged", "flat"],
                        help="im2col layout of the convolutions (hicd_core.functional.CONV_LAYOUTS)")
    parser.add_argument("--no-keep-memory", action="store_true",
                        help="leave glibc's malloc thresholds alone (see hicd_core.backend.keep_host_memory)")
    args = parser.parse_args(argv)
    kept = False if args.no_keep_memory else backend.keep_host_memory()

    xp = backend.namespace(args.backend)
    on_gpu = backend.is_cupy_namespace(xp)
    sync = device_sync(xp)
    if on_gpu:
        import cupy

    host_batch = make_batch(args.batch, args.size)
    x1, x2, x2_hq, label = (backend.from_host(a, xp) for a in host_batch)
    student = build_model(args.model, DEFAULT_WIDTHS, xp=xp, seed=0, conv_layout=args.conv_layout, dropout=args.dropout)
    teacher = (build_model(args.model, DEFAULT_WIDTHS, xp=xp, seed=1, conv_layout=args.conv_layout, dropout=args.dropout)
               if args.mode == "hicd" else None)
    opt = AdamW(student.params, lr=1e-3, weight_decay=1e-2)
    windows, change_window = default_windows(args.size)
    distill = DistillConfig(method="hicd", windows=windows, change_window=change_window) if args.mode == "hicd" else None

    def step():
        with backend.conv_threads(args.threads):
            return train_step(student, opt, x1, x2, label, teacher=teacher, teacher_x2=x2_hq, distill=distill)

    ms, times = median_ms(step, sync, args.steps)
    result = {
        "bench": "train step", "model": args.model, "dropout": args.dropout, "mode": args.mode, "backend": args.backend, "dtype": "float32",
        "batch": args.batch, "size": args.size, "steps": args.steps, "windows": list(windows),
        "conv_layout": args.conv_layout, "threads": args.threads,
        "keep_host_memory": kept,
        "median_ms": round(ms, 3), "min_ms": round(min(times), 3),
        "pairs_per_s": round(args.batch / ms * 1e3, 1),
        "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    if on_gpu:
        pool = cupy.get_default_memory_pool()
        result["peak_mem_mb"] = round(pool.total_bytes() / 2**20, 1)  # the pool's high-water mark
        result["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        tracemalloc.start()
        step()
        result["peak_mem_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    if args.vs_torch:
        twin = torch_step(args, host_batch, windows, change_window)
        if twin is None:
            result["torch"] = "not installed"
        else:
            torch, tstep, tsync, tdevice = twin
            if tdevice == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if args.interleave:
                (ms, times), (tms, _) = interleaved_ms([step, tstep], [sync, tsync], args.steps)
                result.update(median_ms=round(ms, 3), min_ms=round(min(times), 3),
                              pairs_per_s=round(args.batch / ms * 1e3, 1), interleaved=True)
            else:
                tms, _ = median_ms(tstep, tsync, args.steps)
            result.update(
                torch_version=torch.__version__, torch_device=tdevice,
                torch_threads=torch.get_num_threads(), torch_median_ms=round(tms, 3),
                ratio=round(result["median_ms"] / tms, 3),
            )
            if tdevice == "cuda":
                result["torch_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            step()
        sync()
        prof.disable()
        out = _io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
