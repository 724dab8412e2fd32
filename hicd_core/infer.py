"""Evaluation over datasets and tiled sliding-window prediction for images of any size."""

from __future__ import annotations

import math
import numbers

from . import backend
from .functional import sigmoid
from .data.loader import iterate_batches
from .metrics import ConfusionMatrix

__all__ = ["evaluate", "threshold_metrics", "choose_threshold", "best_threshold", "predict_logits", "predict_probability",
           "stream_probability", "dihedral", "dihedral_inverse", "box_mean", "filtered_rows"]

#: How many symmetries of the square test-time averaging uses (``tta=True``).
SYMMETRIES = 8


def dihedral(x, k, *, xp):
    """``x`` (..., H, W) under the ``k``-th symmetry of the square, ``0 <= k < 8``: ``k % 4`` quarter turns,
    then a left-right flip when ``k >= 4`` (a quarter turn swaps H and W)."""
    _check_symmetry(k)
    for _ in range(k % 4):
        x = xp.flip(_swap_last(x, xp=xp), axis=-1)
    return xp.flip(x, axis=-1) if k >= 4 else x


def dihedral_inverse(y, k, *, xp):
    """Undo ``dihedral(., k)``: ``dihedral_inverse(dihedral(x, k), k) == x``."""
    _check_symmetry(k)
    if k >= 4:
        y = xp.flip(y, axis=-1)
    for _ in range(k % 4):
        y = _swap_last(xp.flip(y, axis=-1), xp=xp)
    return y


def _swap_last(x, *, xp):
    axes = list(range(x.ndim))
    axes[-2], axes[-1] = axes[-1], axes[-2]
    return xp.permute_dims(x, tuple(axes))


def _check_symmetry(k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < SYMMETRIES:
        raise ValueError(f"a symmetry of the square is numbered 0..{SYMMETRIES - 1}, got {k!r}")


def _check_filter_radius(radius):
    if isinstance(radius, bool) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise ValueError(f"filter_radius must be a non-negative integer (pixels), got {radius!r}")


def box_mean(prob, radius, *, xp=None):
    """Mean of ``prob`` (..., H, W) over the ``(2 radius + 1)²`` window around each pixel; ``radius`` 0: ``prob``.

    Borders are mirrored about the outer pixel edges (``scipy.ndimage.uniform_filter``'s "reflect"
    mode, which ``tests/test_infer.py`` checks it against), so a constant map stays constant. Two
    one-dimensional running sums (cumulative sums in float64, then differences), on any array-API
    namespace. Used by ``evaluate(..., filter_radius=)``: the change probability averaged over a
    window before the threshold fills holes inside changed areas and drops isolated pixels
    (docs/studies/sztaki-fc-siam-diff-filtered_notes.md has the validation figures that chose it).
    """
    xp = xp if xp is not None else backend.array_namespace(prob)
    _check_filter_radius(radius)
    if prob.ndim < 2:
        raise ValueError(f"box_mean expects an array (..., H, W), got shape {tuple(prob.shape)}")
    if radius == 0:
        return prob
    acc = xp.astype(prob, xp.float64)
    for axis in (-2, -1):
        rows = _reflected(0, acc.shape[axis], radius, acc.shape[axis], xp=xp, device=backend.device(acc))
        acc = _window_sums(xp.take(acc, rows, axis=axis), radius, axis, xp=xp)
    return xp.astype(acc / (2 * radius + 1) ** 2, prob.dtype)


def _reflected(a, b, radius, n, *, xp, device=None):
    """Indices ``a - radius .. b + radius - 1`` folded into ``0 .. n - 1`` by mirroring about the outer pixel
    edges (``... 1 0 | 0 1 ... n-1 | n-1 n-2 ...``), repeatedly where ``radius`` exceeds ``n``."""
    i = xp.arange(a - radius, b + radius, device=device) % (2 * n)
    return xp.where(i < n, i, 2 * n - 1 - i)


def _window_sums(padded, radius, axis, *, xp):
    """Sums of ``2 radius + 1`` consecutive entries along ``axis`` of an array padded by ``radius`` on both sides."""
    size, n = 2 * radius + 1, padded.shape[axis] - 2 * radius
    sums = xp.cumulative_sum(padded, axis=axis, include_initial=True)
    hi, lo = [slice(None)] * padded.ndim, [slice(None)] * padded.ndim
    hi[axis], lo[axis] = slice(size, size + n), slice(0, n)
    return sums[tuple(hi)] - sums[tuple(lo)]


def filtered_rows(rows, radius, height):
    """``box_mean`` over a stream of ``(row0, rows)`` host probabilities (``stream_probability``'s), as a stream.

    Yields ``(row0, rows)`` top to bottom, equal to ``box_mean`` of the whole scene (``height`` rows)
    to float rounding; holds only the rows that a window not yet emitted still reaches.
    """
    _check_filter_radius(radius)
    if radius == 0:
        yield from rows
        return
    xp = backend.namespace("numpy")
    buf, start, done = None, 0, 0  # buf: scene rows start .. start + len(buf); rows before done are out

    def emit(end):  # scene rows done .. end, each window mirrored at the scene's borders
        block = xp.astype(xp.take(buf, _reflected(done, end, radius, height, xp=xp) - start, axis=0), xp.float64)
        block = _window_sums(block, radius, 0, xp=xp)
        block = _window_sums(xp.take(block, _reflected(0, block.shape[1], radius, block.shape[1], xp=xp), axis=1),
                             radius, 1, xp=xp)
        return xp.astype(block / (2 * radius + 1) ** 2, xp.float32)

    for row0, chunk in rows:
        chunk = backend.from_host(chunk, xp)
        buf = chunk if buf is None else xp.concat([buf, chunk])
        ready = row0 + len(chunk) - radius  # a row above this has every row of its window read
        if ready > done:
            yield done, emit(ready)
            done = ready
            keep = max(0, done - radius)  # the first row a later window reaches (mirrored ones lie above it)
            buf, start = buf[keep - start:], keep
    if done < height:
        yield done, emit(height)


def predict_logits(model, x1, x2, *, tta=False):
    """Evaluation-mode logits ``(N, 1, H, W)`` of a batch of pairs ``(N, C, H, W)`` in the model's namespace.

    ``tta``: test-time averaging, the mean of the logits over the eight symmetries of the square
    (``dihedral``), each undone on its output before averaging. A network trained with random flips and
    quarter turns sees every one of them as a likely input; the mean is steadier than any single view and
    costs eight forward passes. Sides must be multiples of the network's ``size_multiple`` (both after a
    quarter turn too, which they are).
    """
    if not tta:
        return model.predict_logits(x1, x2)
    xp = model.xp
    total = None
    for k in range(SYMMETRIES):
        z = model.predict_logits(dihedral(x1, k, xp=xp), dihedral(x2, k, xp=xp))
        z = dihedral_inverse(z, k, xp=xp)
        total = z if total is None else total + z
    return total / SYMMETRIES


def evaluate(model, dataset, *, batch_size=8, ignore_index=None, threshold=0.5, tile=None, comm=None, tta=False,
             filter_radius=0):
    """Change metrics of ``model`` (evaluation mode) over a whole dataset, from one confusion matrix.

    Images whose sides are not multiples of the network's ``size_multiple`` (8 or 16), or larger
    than ``tile`` when given,
    are predicted tile by tile (``predict_probability``, overlap ``min(32, tile / 4)``).
    Samples of different sizes are batched separately. ``comm``: data-parallel ranks
    each predict every ``comm.size``-th sample and add their confusion counts (one
    all-reduce), so every rank returns the metrics of the whole dataset. ``tta``: the logits
    averaged over the eight symmetries of the square (``predict_logits``). ``filter_radius``: each
    image's change probability averaged over the ``(2 r + 1)²`` window around each pixel
    (``box_mean``) before the threshold; 0 (the default) scores the network's map as it is.
    """
    _check_threshold(threshold)
    return _confusions(model, dataset, [threshold], batch_size=batch_size, ignore_index=ignore_index, tile=tile,
                       comm=comm, tta=tta, filter_radius=filter_radius)[0].compute()


def threshold_metrics(model, dataset, thresholds, *, batch_size=8, ignore_index=None, tile=None, tta=False,
                      filter_radius=0):
    """``{threshold: metrics}``: ``evaluate``'s metrics at each decision threshold, each map predicted once.

    At every threshold the comparison is ``evaluate``'s own, so ``threshold_metrics(m, d, [t])[t]`` equals
    ``evaluate(m, d, threshold=t)`` (same keyword arguments).
    """
    thresholds = list(thresholds)
    if not thresholds:
        raise ValueError("threshold_metrics needs at least one threshold")
    for t in thresholds:
        _check_threshold(t)
    thresholds = [float(t) for t in thresholds]
    cms = _confusions(model, dataset, thresholds, batch_size=batch_size, ignore_index=ignore_index, tile=tile,
                      tta=tta, filter_radius=filter_radius)
    return {t: cm.compute() for t, cm in zip(thresholds, cms)}


def choose_threshold(model, dataset, thresholds, **kwargs):
    """``(threshold, {threshold: metrics})``: the threshold of ``thresholds`` with the highest F1 of ``model`` on
    ``dataset`` (validation data, never the test set), ties going to the one nearest 0.5; ``kwargs`` as
    ``threshold_metrics``'s. A network trained with weighted change pixels (``pos_weight``) and soft Dice marks
    more change at 0.5 than the F1-best cut (docs/studies/sztaki-fc-siam-diff-calibrated_notes.md)."""
    scores = threshold_metrics(model, dataset, thresholds, **kwargs)
    return best_threshold({t: m["f1"] for t, m in scores.items()}), scores


def best_threshold(f1_by_threshold):
    """The threshold of highest F1 in ``{threshold: F1}``, ties going to the one nearest 0.5."""
    return max(f1_by_threshold, key=lambda t: (f1_by_threshold[t], -abs(t - 0.5)))


def _confusions(model, dataset, thresholds, *, batch_size, ignore_index, tile, comm=None, tta, filter_radius):
    """One confusion matrix per decision threshold over ``dataset`` (``evaluate``'s predictions, made once)."""
    _check_filter_radius(filter_radius)
    xp = model.xp
    cms = [ConfusionMatrix() for _ in thresholds]
    indices = None if comm is None else range(comm.rank, len(dataset), comm.size)
    for t1, t2, label in iterate_batches(dataset, batch_size, indices):
        H, W = label.shape[-2:]
        if H % model.size_multiple or W % model.size_multiple or (tile is not None and max(H, W) > tile):
            side = tile or 256
            for i in range(len(label)):
                prob = predict_probability(model, t1[i], t2[i], tile=side, overlap=min(32, side // 4), tta=tta,
                                           filter_radius=filter_radius)
                target = backend.from_host(label[i], xp)
                for cm, threshold in zip(cms, thresholds):
                    cm.update(prob >= threshold, target, ignore_index)
            continue
        logits = predict_logits(model, backend.from_host(t1, xp), backend.from_host(t2, xp), tta=tta)
        target = backend.from_host(label, xp)
        if filter_radius:
            prob = box_mean(sigmoid(logits[:, 0, ...]), filter_radius, xp=xp)
            for cm, threshold in zip(cms, thresholds):
                cm.update(prob >= threshold, target, ignore_index)
            continue
        for cm, threshold in zip(cms, thresholds):  # sigmoid(z) >= threshold  <=>  z >= logit(threshold)
            cm.update(logits[:, 0, ...] >= math.log(threshold / (1.0 - threshold)), target, ignore_index)
    if comm is not None:
        for cm in cms:
            counts = comm.allreduce_host([cm.tp, cm.fp, cm.fn, cm.tn])
            cm.tp, cm.fp, cm.fn, cm.tn = (int(v) for v in counts)
    return cms


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
        raise ValueError(f"a decision threshold must be a number strictly between 0 and 1, got {threshold!r}")


def _starts(size, tile, stride):
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def predict_probability(model, t1, t2, *, tile=256, overlap=32, tta=False, filter_radius=0):
    """Change probability ``(H, W)`` for one pair of any size, by overlapping tiles.

    Parameters
    ----------
    model : TinySiamCD or FCSiamDiff
    t1, t2 : host or backend arrays (C, H, W), C the model's input channels (3 for RGB in [0, 1])
    tile : int
        Side of the square windows (a multiple of the network's ``size_multiple``, 8 or 16); smaller
        images are padded.
    overlap : int
        Pixels shared by neighbouring windows; their logits are averaged with a
        weight that falls off linearly towards each window's border, which hides
        the seams.
    tta : bool
        Each window's logits averaged over the eight symmetries of the square (``predict_logits``).
    filter_radius : int
        The scene's probability averaged over the ``(2 r + 1)²`` window around each pixel (``box_mean``,
        after the tiles are blended); 0: as the network gives it.

    Returns
    -------
    array (H, W) of probabilities in the model's namespace.
    """
    xp = model.xp
    _check_tile(tile, model)
    _check_filter_radius(filter_radius)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap}")
    t1 = backend.from_host(backend.to_host(t1), xp, dtype=model.dtype)
    t2 = backend.from_host(backend.to_host(t2), xp, dtype=model.dtype)
    if t1.ndim != 3 or tuple(t1.shape) != tuple(t2.shape) or t1.shape[0] != model.in_channels:
        raise ValueError(f"t1 and t2 must both have shape ({model.in_channels}, H, W), got {tuple(t1.shape)} and {tuple(t2.shape)}")
    C, H, W = t1.shape
    # pad to at least one tile and to multiples of the network's size multiple, replicating the border
    Hp, Wp = _padded(H, W, tile, model.size_multiple)
    pair = xp.stack([t1, t2])
    if (Hp, Wp) != (H, W):
        pair = _pad_edge(pair, Hp, Wp, xp=xp)
    ramp = _ramp(tile, overlap, xp=xp, dtype=t1.dtype)
    weight_tile = ramp[:, None] * ramp[None, :]
    acc = xp.zeros((Hp, Wp), dtype=t1.dtype)
    norm = xp.zeros((Hp, Wp), dtype=t1.dtype)
    stride = tile - overlap
    for y in _starts(Hp, tile, stride):
        for x in _starts(Wp, tile, stride):
            window = pair[:, :, y : y + tile, x : x + tile]
            logits = predict_logits(model, window[0:1, ...], window[1:2, ...], tta=tta)[0, 0, ...]
            acc[y : y + tile, x : x + tile] += logits * weight_tile
            norm[y : y + tile, x : x + tile] += weight_tile
    return box_mean(sigmoid(acc[:H, :W] / norm[:H, :W]), filter_radius, xp=xp)


def stream_probability(model, t1, t2, *, tile=256, overlap=32, progress=False, tta=False):
    """``predict_probability`` read and returned by rows, in memory bounded by the tile.

    Yields ``(row0, rows)``: host float32 probabilities ``rows`` of shape ``(n, W)``
    for scene rows ``row0 .. row0 + n``, top to bottom, each row exactly once. The
    windows, padding and blending are those of ``predict_probability`` (the two agree
    to float32 rounding); only the rows a later window can still touch are held, two
    ``tile x W`` float buffers, and each window is read from its source when needed.

    Parameters
    ----------
    model : TinySiamCD or FCSiamDiff
    t1, t2 : sources with ``count, height, width`` and ``read(y0, y1, x0, x1) -> (C, h, w)``
        (``data.raster.ArraySource``, ``data.raster.RasterSource``), or ``(C, H, W)`` arrays.
    tile, overlap, tta : as in ``predict_probability``.
    progress : bool
        A tqdm bar over the windows (when tqdm is installed).
    """
    from .progress import Progress
    from .data.raster import ArraySource

    xp = model.xp
    _check_tile(tile, model)
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap}")
    t1 = t1 if hasattr(t1, "read") else ArraySource(backend.to_host(t1), name="t1")
    t2 = t2 if hasattr(t2, "read") else ArraySource(backend.to_host(t2), name="t2")
    for name, src in (("t1", t1), ("t2", t2)):
        if src.count != model.in_channels:
            raise ValueError(f"{getattr(src, 'name', name)}: {src.count} band(s), but the model takes "
                             f"{model.in_channels} input channel(s) (choose bands with --bands)")
    if (t1.height, t1.width) != (t2.height, t2.width):
        raise ValueError(f"t1 and t2 differ in size: {t1.height}x{t1.width} and {t2.height}x{t2.width}")
    H, W = t1.height, t1.width
    Hp, Wp = _padded(H, W, tile, model.size_multiple)
    ramp = _ramp(tile, overlap, xp=xp, dtype=model.dtype)
    weight_tile = ramp[:, None] * ramp[None, :]
    stride = tile - overlap
    ys, xs = _starts(Hp, tile, stride), _starts(Wp, tile, stride)
    bar = Progress(len(ys) * len(xs), "predicting", progress)
    lo = 0  # scene row of the buffers' first row
    acc = xp.zeros((0, Wp), dtype=model.dtype)
    norm = xp.zeros((0, Wp), dtype=model.dtype)
    try:
        for k, y in enumerate(ys):
            grow = y + tile - lo - acc.shape[0]
            if grow > 0:
                acc = xp.concat([acc, xp.zeros((grow, Wp), dtype=model.dtype)])
                norm = xp.concat([norm, xp.zeros((grow, Wp), dtype=model.dtype)])
            for x in xs:
                pair = xp.stack([_read_window(src, y, x, tile, H, W, xp=xp, dtype=model.dtype) for src in (t1, t2)])
                logits = predict_logits(model, pair[0:1, ...], pair[1:2, ...], tta=tta)[0, 0, ...]
                acc[y - lo : y - lo + tile, x : x + tile] += logits * weight_tile
                norm[y - lo : y - lo + tile, x : x + tile] += weight_tile
                bar.update(1)
            done = min(ys[k + 1] if k + 1 < len(ys) else Hp, H)  # rows no later window touches
            if done > lo:
                n = done - lo
                yield lo, backend.to_host(sigmoid(acc[:n, :W] / norm[:n, :W]))
                acc, norm, lo = acc[n:], norm[n:], done
    finally:
        bar.close()


def _check_tile(tile, model):
    m = model.size_multiple
    if tile % m or tile < m:
        raise ValueError(f"tile must be a positive multiple of {m} for {type(model).__name__}, got {tile}")


def _padded(H, W, tile, multiple):
    """The padded scene size: at least one tile, sides rounded up to ``multiple``."""
    return max(tile, math.ceil(H / multiple) * multiple), max(tile, math.ceil(W / multiple) * multiple)


def _read_window(src, y, x, tile, H, W, *, xp, dtype):
    """The ``tile x tile`` window at ``(y, x)``, its part beyond the scene filled by replicating the border."""
    window = backend.from_host(src.read(y, min(y + tile, H), x, min(x + tile, W)), xp, dtype=dtype)
    return _pad_edge(window, tile, tile, xp=xp)


def _ramp(tile, overlap, *, xp, dtype):
    """1 in the middle, rising linearly over ``overlap`` pixels at each end (never 0)."""
    i = xp.arange(tile, dtype=dtype)
    if overlap == 0:
        return xp.ones((tile,), dtype=dtype)
    edge = xp.minimum(i + 1.0, tile - i)
    return xp.minimum(edge / (overlap + 1.0), 1.0)


def _pad_edge(x, Hp, Wp, *, xp):
    """Replicate the last row / column of (..., H, W) out to (..., Hp, Wp)."""
    H, W = x.shape[-2:]
    if Hp > H:
        last = x[..., H - 1 : H, :]
        x = xp.concat([x, xp.broadcast_to(last, (*x.shape[:-2], Hp - H, W))], axis=-2)
    if Wp > W:
        last = x[..., :, W - 1 : W]
        x = xp.concat([x, xp.broadcast_to(last, (*x.shape[:-1], Wp - W))], axis=-1)
    return x
