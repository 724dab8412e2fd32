"""Write one A/B pair of a dataset folder as two georeferenced GeoTIFFs (a small geodata example).

    python examples/geotiff_pair.py ../shared/data/sztaki-airchange szada_1 --out geo
    hicd predict geo/t1.tif geo/t2.tif -o geo/change.tif --checkpoint runs/<run>/teacher/best.h5

The pixels are the PNGs' (uint8 RGB); the georeferencing is made up: UTM zone 34N
(EPSG:32634, where the SZTAKI scenes lie), the scene's upper-left corner at
``--origin`` and ``--pixel-size`` metres per pixel (SZTAKI: 1.5 m). The label, when
present, is written as ``label.tif`` on the same grid. Needs rasterio
(``pip install 'hicd[geo]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hicd_core.data import FolderDataset  # noqa: E402
from hicd_core.errors import HicdError  # noqa: E402
from hicd_core.data.raster import write_raster  # noqa: E402

CRS = "EPSG:32634"


def write_pair(folder, name, out, *, origin=(500000.0, 5250000.0), pixel_size=1.5, label_threshold=128):
    """Write ``out/t1.tif``, ``out/t2.tif`` and ``out/label.tif`` for sample ``name`` of ``folder``; their paths."""
    from affine import Affine

    ds = FolderDataset(folder, label_threshold=label_threshold)
    if name not in ds.names:
        raise HicdError(f"{folder}: no sample named {name!r} (have {', '.join(ds.names[:6])}...)")
    t1, t2, label = ds[ds.names.index(name)]
    transform = Affine(pixel_size, 0.0, origin[0], 0.0, -pixel_size, origin[1])
    out = Path(out)
    paths = {}
    for key, image in (("t1", t1), ("t2", t2)):
        pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        paths[key] = write_raster(out / f"{key}.tif", pixels, crs=CRS, transform=transform)
    paths["label"] = write_raster(out / "label.tif", label.astype(np.uint8), crs=CRS, transform=transform)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="an A/B/label folder")
    parser.add_argument("name", help="the sample (file name without extension)")
    parser.add_argument("--out", default="geo", help="output folder (default geo)")
    parser.add_argument("--origin", type=float, nargs=2, default=(500000.0, 5250000.0), metavar=("EAST", "NORTH"),
                        help="upper-left corner in metres, UTM 34N (made up)")
    parser.add_argument("--pixel-size", type=float, default=1.5, help="metres per pixel (default 1.5)")
    args = parser.parse_args(argv)
    try:
        paths = write_pair(args.data, args.name, args.out, origin=args.origin, pixel_size=args.pixel_size)
    except (HicdError, OSError, ImportError) as exc:
        print(f"geotiff_pair.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
