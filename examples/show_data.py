"""Draw a few synthetic pairs with their labels and their degraded t2 under each setting.

    python examples/show_data.py                 # writes docs/images/data.png
    python examples/show_data.py --n 3 --size 128 --out data.png

Columns: t1, t2 (high quality), label, then t2 under resolution-x4,
resolution-x8, single and multi (seed = the row index). Needs Pillow (the io extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core.data import SETTINGS, degrade, synthetic_pairs  # noqa: E402
from hicd_core.data.folder import image_grid, to_uint8, write_png  # noqa: E402


def panel(n=4, size=128, seed=0, gap=4):
    t1, t2, label = synthetic_pairs(n, size, seed)
    rows = []
    for i in range(n):
        tiles = [to_uint8(t1[i]), to_uint8(t2[i]), np.repeat(to_uint8(label[i] == 1)[:, :, None], 3, axis=2)]
        tiles += [to_uint8(degrade(t2[i], s, [seed, i])) for s in SETTINGS]
        rows.append(tiles)
    return image_grid(rows, gap)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "data.png"))
    args = parser.parse_args(argv)
    write_png(panel(args.n, args.size, args.seed), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
