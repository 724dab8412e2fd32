"""The two scenes of ``hicd predict``: any image file opened as a source, the outputs written from streamed rows.

Built on ``data.raster`` (GeoTIFF sources and sinks) and ``data.folder`` (PNG / JPEG files),
which do not import each other's way back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .folder import change_overlay, read_image, to_uint8, write_png
from .raster import MASK_NODATA, ArraySource, RasterSink, RasterSource, is_geotiff, select_bands

__all__ = ["open_source", "write_change_maps"]


def open_source(path, bands=None, *, align_to=None):
    """A GeoTIFF as a ``RasterSource``; any other image file (PNG, JPEG) read whole into an ``ArraySource``."""
    path = Path(path)
    if is_geotiff(path):
        return RasterSource(path, bands, align_to=align_to)
    if align_to is not None:
        raise DatasetError(f"{path}: --align resamples GeoTIFFs onto each other's grid; this is not a GeoTIFF")
    return ArraySource(select_bands(read_image(path), bands, name=str(path)), name=path)


def write_change_maps(rows, t1, t2, *, mask, probability=None, overlay=None, threshold=0.5):
    """Write the outputs of ``hicd predict`` from streamed probability rows; ``(changed, valid)`` pixel counts.

    ``rows``: ``(row0, probabilities (n, W))`` from ``infer.stream_probability``; ``t1``,
    ``t2``: its sources (their ``valid`` masks give the nodata pixels). ``mask`` and
    ``probability`` are paths: a GeoTIFF is written row by row (``RasterSink``; nodata
    ``MASK_NODATA`` / NaN), a PNG is gathered whole (0/255 mask, 8-bit probability, nodata as
    no change / 0) and written at the end; ``overlay`` draws the change on ``t2`` (an
    ``ArraySource``) as a PNG. Change is ``probability >= threshold`` on valid pixels.
    """
    H, W = t1.height, t1.width
    with contextlib.ExitStack() as stack:
        sinks, whole = {}, {}  # GeoTIFF outputs written by rows; PNG outputs gathered whole (they fit in memory)
        for key, path in (("mask", mask), ("probability", probability)):
            if path is None:
                continue
            if is_geotiff(path):
                sinks[key] = stack.enter_context(RasterSink(path, t1, key))
            else:
                whole[key] = np.zeros((H, W), np.float32 if key == "probability" else bool)
        if overlay:
            whole.setdefault("mask", np.zeros((H, W), bool))
        changed = valid_pixels = 0
        for row0, prob in rows:
            valid = _valid_rows(t1, t2, row0, row0 + len(prob), W)
            change = prob >= threshold
            if valid is not None:
                change &= valid
            changed += int(change.sum())
            valid_pixels += int(valid.sum()) if valid is not None else change.size
            if "mask" in sinks:
                out = change.astype(np.uint8)
                if valid is not None:
                    out[~valid] = MASK_NODATA
                sinks["mask"].write(row0, out)
            if "probability" in sinks:
                sinks["probability"].write(row0, prob if valid is None else np.where(valid, prob, np.nan))
            if "mask" in whole:
                whole["mask"][row0 : row0 + len(prob)] = change
            if "probability" in whole:
                whole["probability"][row0 : row0 + len(prob)] = prob if valid is None else np.where(valid, prob, 0.0)
        for sink in sinks.values():
            sink.commit()
    if "mask" in whole and not is_geotiff(mask):
        write_png(to_uint8(whole["mask"]), mask)
    if "probability" in whole:
        write_png(to_uint8(whole["probability"]), probability)
    if overlay:
        write_png(change_overlay(t2.image, whole["mask"]), overlay)
    return changed, valid_pixels


def _valid_rows(t1, t2, y0, y1, W):
    """Pixels of rows ``y0..y1`` that hold data in both inputs (None: every pixel does)."""
    masks = [m for m in (t1.valid(y0, y1, 0, W), t2.valid(y0, y1, 0, W)) if m is not None]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] & masks[1]
