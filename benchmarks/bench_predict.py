"""Streamed prediction on a large GeoTIFF pair: peak memory (RSS) and throughput.

    python benchmarks/bench_predict.py --size 20000            # the issue-17 figure (tens of minutes on 2 cores)
    python benchmarks/bench_predict.py --size 4096 --repeats 3 # throughput only, quicker

Writes a ``size``-square 3-band uint8 pair (tiled, deflate; synthetic scenes laid
side by side, written block row by block row) into ``--workdir`` unless it is
there already, then runs ``hicd predict a.tif b.tif -o change.tif`` in a child
process with a default-width model (fresh weights: the speed does not depend on
them) and prints one JSON line per run: wall seconds, pixels per second and the
child's peak resident memory (``ru_maxrss``). ``--out FILE`` appends the lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _timing import emit, host_fields  # noqa: E402

# VmHWM: the child's own peak since exec (ru_maxrss would include the parent's resident memory at
# the fork, which Linux keeps across execve)
CHILD = """
import json, re, sys, time
from hicd_core.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_kb / 1024}))
"""


def write_pair(workdir: Path, size: int, block: int = 256):
    """``a.tif`` and ``b.tif``: synthetic 512-pixel scenes (t1 / t2 of one pair) repeated over the square."""
    import rasterio
    from affine import Affine

    from hicd_core.data import synthetic_pair

    paths = [workdir / f"{name}-{size}.tif" for name in ("a", "b")]
    if all(p.exists() for p in paths):
        return paths
    t1, t2, _ = synthetic_pair(0, 512, seed=7)
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 3, "dtype": "uint8", "tiled": True,
               "blockxsize": block, "blockysize": block, "compress": "deflate", "BIGTIFF": "IF_SAFER",
               "crs": "EPSG:32634", "transform": Affine(1.5, 0, 500000.0, 0, -1.5, 5250000.0)}
    for path, scene in zip(paths, (t1, t2)):
        pixels = np.round(scene * 255).astype(np.uint8)
        reps = -(-size // 512)
        row_band = np.tile(pixels, (1, 1, reps))[:, :, :size]  # (3, 512, size)
        tmp = path.with_name(path.name + ".part")
        with rasterio.open(tmp, "w", **profile) as ds:
            for y in range(0, size, block):
                h = min(block, size - y)
                rows = row_band[:, (y % 512) : (y % 512) + h]
                if rows.shape[1] < h:  # wraps around the scene
                    rows = np.concatenate([rows, row_band[:, : h - rows.shape[1]]], axis=1)
                ds.write(rows, window=rasterio.windows.Window(0, y, size, h))
        os.replace(tmp, path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the pair is written (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)

    from hicd_core.io import save_checkpoint
    from hicd_core.model import TinySiamCD

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        a, b = write_pair(workdir, args.size)
        written = time.perf_counter() - start
        checkpoint = Path(tmp) / "model.h5"
        save_checkpoint(checkpoint, model=TinySiamCD())
        for run in range(args.repeats):
            out = Path(tmp) / "change.tif"
            child = subprocess.run([sys.executable, "-c", CHILD, "predict", str(a), str(b), "-o", str(out),
                                    "--checkpoint", str(checkpoint), "--tile", str(args.tile), "--no-progress"],
                                   capture_output=True, text=True, cwd=ROOT)
            if child.returncode != 0:
                sys.exit(f"bench_predict: the prediction failed:\n{child.stderr}")
            stats = json.loads(child.stdout.strip().splitlines()[-1])
            row = {"bench": "predict_stream", "size": args.size, "tile": args.tile, "run": run,
                   "seconds": round(stats["seconds"], 2),
                   "pixels_per_s": round(args.size * args.size / stats["seconds"]),
                   "peak_rss_mb": round(stats["peak_rss_mb"], 1), "output_mb": round(out.stat().st_size / 2**20, 1),
                   "input_written_s": round(written, 1), **host_fields()}
            emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
