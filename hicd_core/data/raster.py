"""Image pairs read window by window, and change maps written window by window (GeoTIFF I/O).

The streaming predictor (``infer.stream_probability``) reads its tiles through a
*source* and the ``hicd predict`` command writes the finished rows through a
*sink*, so that memory depends on the tile and not on the scene:

- ``ArraySource``: an image already in memory, ``(C, H, W)`` float32 (PNG/JPEG inputs);
- ``RasterSource``: a GeoTIFF read through rasterio (the optional ``geo`` extra,
  imported only here and only when a GeoTIFF is opened), bands chosen by their
  1-based GDAL index, optionally resampled onto another raster's grid (``align_to``);
- ``RasterSink``: a tiled, deflate-compressed GeoTIFF written block row by block
  row to a temporary file that replaces the target only once complete.

``data.scenes`` opens any image file as a source and writes ``hicd predict``'s outputs
(GeoTIFF or PNG) through these.

Pixel values. Integer rasters are divided by the largest value of their data type
(uint8 by 255, uint16 by 65535, int16 by 32767), so an 8-bit GeoTIFF and the same
image as PNG give the same input; floating-point rasters are used as stored. A
checkpoint trained with ``--normalize`` standardises its inputs with statistics of
its training set, which absorbs any remaining scale (e.g. Sentinel-2 reflectances
0-10000 in uint16). Training folders of GeoTIFFs are read the same way
(``read_raster``), so training and prediction see the same numbers.

Nodata. A pixel is *nodata* in an input when all of its selected bands are masked
(each band's nodata value, an internal mask, an alpha band, or outside t2's
footprint after ``align_to``): GDAL's dataset-mask rule, under which a dark pixel
with one band at the nodata value is still data. Change maps mark pixels that are nodata in either input as
nodata: ``MASK_NODATA`` (255) in the uint8 mask, whose class values are 0 (no
change) and 1 (change), and NaN in the float32 probability map.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import DatasetError

__all__ = [
    "GEOTIFF_SUFFIXES",
    "MASK_NODATA",
    "ArraySource",
    "RasterSource",
    "RasterSink",
    "is_geotiff",
    "read_raster",
    "read_raster_label",
    "raster_shape",
    "check_same_grid",
    "select_bands",
    "checked_bands",
    "write_raster",
    "gdal_environment",
]

GEOTIFF_SUFFIXES = (".tif", ".tiff")
MASK_NODATA = 255
_BLOCK = 256
_GDAL_CACHE_MB = 64  # GDAL's block cache; its default (5 % of RAM) would make peak memory scale with the host


def rasterio_module():
    """``rasterio``, or an ImportError that says how to install it."""
    try:
        import rasterio
    except ImportError:
        raise ImportError("GeoTIFF input and output need rasterio: pip install 'hicd[geo]'") from None
    return rasterio


def is_geotiff(path) -> bool:
    return Path(path).suffix.lower() in GEOTIFF_SUFFIXES


def _scale(dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def _to_float(raw):
    """Raster values as float32 on the [0, 1] scale of integer types (floats as stored)."""
    out = raw.astype(np.float32)
    scale = _scale(raw.dtype)
    if scale != 1.0:
        out *= np.float32(1.0 / scale)
    return out


def checked_bands(bands, count, name):
    """``bands`` as 1-based ints within ``count`` (all bands for None), or a one-line error naming ``name``."""
    if bands is None:
        return list(range(1, count + 1))
    bands = [int(b) for b in bands]
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise DatasetError(f"{name}: band {bad[0]} requested but the image has {count} band(s) (1-based)")
    return bands


def select_bands(image, bands, *, name="image"):
    """Bands ``bands`` (1-based, GDAL's numbering) of a ``(C, H, W)`` array; all of them for None."""
    if bands is None:
        return image
    return np.ascontiguousarray(image[[b - 1 for b in checked_bands(bands, image.shape[0], name)]])


def _open(path):
    rasterio = rasterio_module()
    try:
        with warnings.catch_warnings():  # a TIFF without georeferencing is an ordinary image here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise DatasetError(f"{path}: cannot read raster ({exc})") from None


def read_raster(path, bands=None) -> np.ndarray:
    """A whole raster as float32 ``(C, H, W)`` (integer types scaled to [0, 1], see the module docs)."""
    with _open(path) as src:
        return _to_float(src.read(checked_bands(bands, src.count, path)))


def read_raster_label(path) -> np.ndarray:
    """A single-band raster label as its raw values ``(H, W)`` (binarised by the caller)."""
    with _open(path) as src:
        if src.count != 1:
            raise DatasetError(f"{path}: label has {src.count} bands; expected a single-band mask")
        return src.read(1)


def raster_shape(path) -> tuple[int, int, int]:
    """``(bands, height, width)`` from the header, nothing decoded."""
    with _open(path) as src:
        return src.count, src.height, src.width


# --------------------------------------------------------------------------- sources


class _Source:
    """What every source shares: ``close()`` and use in ``with``."""

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(_Source):
    """An image in memory, ``(C, H, W)``, read by windows like a raster (no georeferencing, no nodata)."""

    crs = transform = None

    def __init__(self, image, *, name="image"):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"{name}: expected an image (C, H, W), got shape {image.shape}")
        self.image, self.name = image, str(name)
        self.count, self.height, self.width = image.shape
        self.has_nodata = False

    def read(self, y0, y1, x0, x1):
        return self.image[:, y0:y1, x0:x1]

    def valid(self, y0, y1, x0, x1):
        return None


class RasterSource(_Source):
    """A GeoTIFF (any raster GDAL reads) read by windows.

    Parameters
    ----------
    path : path
    bands : sequence of int, optional
        1-based band indices to read, in this order (default: all).
    align_to : RasterSource, optional
        Resample this raster onto ``align_to``'s grid (CRS, transform and size) with
        bilinear interpolation, through a GDAL warped VRT (read by windows as well).
    """

    def __init__(self, path, bands=None, *, align_to=None):
        self.path = self.name = str(path)
        self._src = _open(path)
        self._vrt = None
        try:
            self._bands = checked_bands(bands, self._src.count, path)
            ds = self._src
            if align_to is not None:
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT

                if self._src.crs is None or align_to.crs is None:
                    raise DatasetError(f"{path}: --align needs both rasters georeferenced (a CRS on each)")
                self._vrt = WarpedVRT(self._src, crs=align_to.crs, transform=align_to.transform,
                                      width=align_to.width, height=align_to.height, resampling=Resampling.bilinear,
                                      add_alpha=self._src.nodata is None)
                ds = self._vrt
            self._ds = ds
            self.count, self.height, self.width = len(self._bands), ds.height, ds.width
            self.crs, self.transform, self.nodata, self.dtype = ds.crs, ds.transform, self._src.nodata, ds.dtypes[0]
            from rasterio.enums import MaskFlags

            flags = [ds.mask_flag_enums[b - 1] for b in self._bands]
            self.has_nodata = align_to is not None or any(MaskFlags.all_valid not in f for f in flags)
        except BaseException:
            self.close()
            raise

    def _window(self, y0, y1, x0, x1):
        from rasterio.windows import Window

        return Window(x0, y0, x1 - x0, y1 - y0)

    def read(self, y0, y1, x0, x1):
        return _to_float(self._ds.read(self._bands, window=self._window(y0, y1, x0, x1)))

    def valid(self, y0, y1, x0, x1):
        """Boolean ``(h, w)``: True where any selected band holds data; None when the raster has no mask."""
        if not self.has_nodata:
            return None
        masks = self._ds.read_masks(self._bands, window=self._window(y0, y1, x0, x1))
        return np.any(masks > 0, axis=0)

    def close(self):
        for ds in (self._vrt, self._src):
            if ds is not None:
                ds.close()


def check_same_grid(a, b):
    """Raise one line naming what differs when two sources are not on one pixel grid."""
    if (a.height, a.width) != (b.height, b.width):
        raise DatasetError(f"{b.name}: size {b.height}x{b.width} differs from {a.name} {a.height}x{a.width} "
                           "(use --align to resample t2 onto t1's grid)")
    if not (isinstance(a, RasterSource) and isinstance(b, RasterSource)):
        return  # an image without georeferencing: its size is all there is to compare
    if a.crs != b.crs:
        raise DatasetError(f"{b.name}: CRS {b.crs} differs from {a.name} {a.crs} (use --align to resample t2 "
                           "onto t1's grid)")
    if a.transform is not None and b.transform is not None and not a.transform.almost_equals(b.transform):
        raise DatasetError(f"{b.name}: geotransform {tuple(b.transform)[:6]} differs from {a.name} "
                           f"{tuple(a.transform)[:6]} (use --align to resample t2 onto t1's grid)")


# --------------------------------------------------------------------------- sinks


def gdal_environment(*paths):
    """A rasterio environment with a small GDAL block cache when any of ``paths`` is a GeoTIFF.

    GDAL's default cache (5 % of RAM) would let a long streamed write hold hundreds of
    megabytes of blocks; 64 MB keeps peak memory set by the tile. A no-op context
    otherwise (rasterio is then not imported).
    """
    import contextlib

    if not any(p is not None and is_geotiff(p) for p in paths):
        return contextlib.nullcontext()
    return rasterio_module().Env(GDAL_CACHEMAX=_GDAL_CACHE_MB)


class RasterSink:
    """A single-band GeoTIFF written by rows: the uint8 change mask or the float32 probability.

    Tiled (256 x 256 blocks), deflate-compressed, BigTIFF when needed, with the CRS
    and transform of ``like`` (none for sources without georeferencing). Rows go to
    a temporary file beside ``path``; ``commit()`` closes it and renames it over
    ``path``, ``abort()`` (or an exception inside ``with``) removes it.
    """

    def __init__(self, path, like, kind):
        rasterio = rasterio_module()
        if kind not in ("mask", "probability"):
            raise ValueError(f"kind must be 'mask' or 'probability', got {kind!r}")
        self.path, self.kind = Path(path), kind
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        profile = {"driver": "GTiff", "height": like.height, "width": like.width, "count": 1,
                   "dtype": "uint8" if kind == "mask" else "float32",
                   "nodata": MASK_NODATA if kind == "mask" else math.nan,
                   "tiled": True, "blockxsize": _BLOCK, "blockysize": _BLOCK, "compress": "deflate",
                   "BIGTIFF": "IF_SAFER"}
        if like.crs is not None:
            profile["crs"] = like.crs
        if like.transform is not None:
            profile["transform"] = like.transform
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._ds = rasterio.open(self._tmp, "w", **profile)

    def write(self, row0, block):
        from rasterio.windows import Window

        block = np.asarray(block)
        self._ds.write(block[None], window=Window(0, row0, block.shape[1], block.shape[0]))

    def commit(self):
        self._ds.close()
        fd = os.open(self._tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)

    def abort(self):
        if not self._ds.closed:
            self._ds.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()


def write_raster(path, array, *, crs=None, transform=None, nodata=None):
    """Write a ``(C, H, W)`` or ``(H, W)`` array as a tiled, deflate-compressed GeoTIFF, atomically.

    The array's dtype is kept (e.g. uint8, uint16, float32); ``crs`` (anything
    rasterio accepts, e.g. ``"EPSG:32634"``), ``transform`` (an ``affine.Affine``)
    and ``nodata`` are written when given.
    """
    rasterio = rasterio_module()
    from ..io import atomic_path

    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected an array (C, H, W) or (H, W), got shape {array.shape}")
    C, H, W = array.shape
    profile = {"driver": "GTiff", "height": H, "width": W, "count": C, "dtype": array.dtype.name,
               "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    if H >= _BLOCK and W >= _BLOCK:
        profile.update(tiled=True, blockxsize=_BLOCK, blockysize=_BLOCK)
    for key, value in (("crs", crs), ("transform", transform), ("nodata", nodata)):
        if value is not None:
            profile[key] = value
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(array)
    return Path(path)
