"""Self-, cross- and global correlation of feature maps, forward and backward.

The three correlations of HiCD (Pang et al., IEEE TGRS 2024, arXiv 2401.10752,
Sec. III-B; normative definitions in SPEC section 2):

* self-correlation ``SC(f, window) -> (N, K, M, M)``: cosine similarity of every
  pair of pixels inside each non-overlapping ``window x window`` block of one
  feature map;
* cross-correlation ``CC(f1, f2, window) -> (N, K, M, M)``: the same between the
  pixels of two feature maps (t1 rows, t2 columns);
* global correlation ``GC(f) -> (B, B)``: cosine similarity of the spatially
  averaged feature vectors of every pair of images in a batch.

Every function is written once against the array API and composed from four
building blocks, each with a hand-derived backward (derivations with shapes in
``docs/MATH.md``):

``window_features``  (N, C, H, W) -> (N, K, M, C): window partition followed by
                     per-pixel L2 normalisation ``fhat = f / sqrt(|f|^2 + eps)``;
``gram``             X -> X X^T, or (X1, X2) -> X1 X2^T;
``pooled_features``  (B, C, H, W) -> (B, C): spatial mean.

Form of the API: each correlation has ``name(...) -> R``, ``name_forward(...) ->
(R, cache)`` and ``name_backward(dR, cache) -> gradient(s)``; the cache is a small
named tuple and is never modified.
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import array_namespace, device, self_product_operand

__all__ = [
    "self_correlation",
    "self_correlation_forward",
    "self_correlation_backward",
    "cross_correlation",
    "cross_correlation_forward",
    "cross_correlation_backward",
    "global_correlation",
    "global_correlation_forward",
    "global_correlation_backward",
    "global_vectors",
    "global_vectors_backward",
    "window_features",
    "window_features_backward",
    "gram",
    "gram_backward",
    "check_window",
    "check_feature",
    "check_pair",
]


# --------------------------------------------------------------------------- checks


def check_feature(f, name: str) -> tuple[int, int, int, int]:
    shape = tuple(f.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}): every axis of (N, C, H, W) needs at least one element")
    return shape


def check_window(shape, window, name: str = "feature map") -> None:
    """Raise ``ValueError`` unless ``window`` (int or None) tiles ``shape``'s H x W exactly."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive int or None, got {window!r} for {name} of shape {tuple(shape)}")
    H, W = shape[-2], shape[-1]
    if H % window or W % window:
        raise ValueError(
            f"window {window} does not divide the spatial size of {name} of shape {tuple(shape)}: "
            f"H={H} and W={W} must both be multiples of {window}"
        )


# --------------------------------------------------------------------------- building blocks


class WindowCache(NamedTuple):
    """What ``window_features_backward`` needs: the normalised features and their inverse norms."""

    xhat: object  # (N, K, M, C) normalised features
    inv_norm: object  # (N, K, M, 1) 1 / sqrt(|f(p)|^2 + eps)
    shape: tuple  # (N, C, H, W) of the input
    window: int | None


def _partition(f, window, *, xp):
    """(N, C, H, W) -> (N, K, M, C) with k = (y//w)*(W//w) + x//w and i = (y%w)*w + x%w."""
    N, C, H, W = f.shape
    if window is None:
        return xp.permute_dims(xp.reshape(f, (N, 1, C, H * W)), (0, 1, 3, 2))
    w = window
    blocks = xp.reshape(f, (N, C, H // w, w, W // w, w))
    blocks = xp.permute_dims(blocks, (0, 2, 4, 3, 5, 1))  # N, Hb, Wb, wy, wx, C
    return xp.reshape(blocks, (N, (H // w) * (W // w), w * w, C))


def _unpartition(x, shape, window, *, xp):
    """Inverse of ``_partition``: (N, K, M, C) -> (N, C, H, W)."""
    N, C, H, W = shape
    if window is None:
        return xp.reshape(xp.permute_dims(x, (0, 1, 3, 2)), (N, C, H, W))
    w = window
    blocks = xp.reshape(x, (N, H // w, W // w, w, w, C))
    blocks = xp.permute_dims(blocks, (0, 5, 1, 3, 2, 4))  # N, C, Hb, wy, Wb, wx
    return xp.reshape(blocks, (N, C, H, W))


def _row_sum(x, *, xp):
    """Sum along the last axis, keepdims, as a matrix-vector product.

    Equal to ``xp.sum(x, axis=-1, keepdims=True)``; BLAS runs this several times
    faster than NumPy's reduction over a short contiguous axis (16 to 128 entries here).
    """
    ones = xp.ones((x.shape[-1], 1), dtype=x.dtype, device=device(x))
    return xp.matmul(x, ones)


def _normalize(x, eps, *, xp):
    """L2-normalise along the last axis with eps inside the square root.

    A squared norm that overflows (float32 vectors of norm above about 1.8e19) would give
    a zero vector and so a finite but wrong loss; it gives NaN instead, which the loss's
    non-finite check reports (the correlations are scale invariant, the arithmetic is not).
    """
    sq = _row_sum(x * x, xp=xp)
    inv_norm = xp.where(xp.isinf(sq), xp.nan, 1.0 / xp.sqrt(sq + eps))
    return x * inv_norm, inv_norm


def _normalize_backward(dxhat, xhat, inv_norm, *, xp):
    """dx = r * (dxhat - xhat <xhat, dxhat>), with r = 1/sqrt(|x|^2 + eps) (docs/MATH.md, 2)."""
    proj = _row_sum(xhat * dxhat, xp=xp)
    return inv_norm * (dxhat - xhat * proj)


def window_features(f, window=None, eps=1e-6):
    """Partition ``f`` into windows and L2-normalise every pixel's feature vector.

    Parameters
    ----------
    f : array (N, C, H, W)
    window : int or None
        Side of the square windows (must divide H and W); None: one window.
    eps : float
        Added to the squared norm inside the square root.

    Returns
    -------
    X : array (N, K, M, C)
        ``X[n, k, i] = fhat[n, :, p_ki]``, K windows of M pixels, row-major order.
    cache : WindowCache
    """
    xp = array_namespace(f)
    shape = check_feature(f, "f")
    check_window(shape, window, "f")
    xhat, inv_norm = _normalize(_partition(f, window, xp=xp), eps, xp=xp)
    return xhat, WindowCache(xhat, inv_norm, shape, window)


def window_features_backward(dX, cache: WindowCache):
    """Gradient of ``window_features``: (N, K, M, C) -> (N, C, H, W)."""
    xp = array_namespace(dX)
    dpart = _normalize_backward(dX, cache.xhat, cache.inv_norm, xp=xp)
    return _unpartition(dpart, cache.shape, cache.window, xp=xp)


def gram(X1, X2=None):
    """Gram products of window features: ``R = X1 X2^T`` over the last two axes (``X2 = X1`` when None).

    ``(N, K, M, C), (N, K, M, C) -> (N, K, M, M)``; on ``window_features`` this is the
    self- (one argument) or cross-correlation (two).
    """
    xp = array_namespace(X1, X2)
    return xp.matmul(X1, self_product_operand(X1, xp) if X2 is None else xp.matrix_transpose(X2))


def gram_backward(dR, X1, X2=None):
    """Gradient of ``gram``: ``R = X X^T => dX = (dR + dR^T) X``; ``R = X1 X2^T => (dR X2, dR^T X1)``."""
    xp = array_namespace(dR, X1, X2)
    if X2 is None:
        return xp.matmul(dR + xp.matrix_transpose(dR), X1)
    return xp.matmul(dR, X2), xp.matmul(xp.matrix_transpose(dR), X1)


# --------------------------------------------------------------------------- self-correlation


class SelfCache(NamedTuple):
    features: WindowCache


def self_correlation_forward(f, window=None, eps=1e-6):
    """Self-correlation and its cache.

    Parameters
    ----------
    f : array (N, C, H, W)
    window : int or None
    eps : float

    Returns
    -------
    R : array (N, K, M, M), ``R[n, k, i, j] = <fhat[n, :, p_ki], fhat[n, :, p_kj]>``
    cache : SelfCache

    Notes
    -----
    With X = window_features(f): ``R = X X^T`` and ``dX = (dR + dR^T) X``.
    """
    X, wcache = window_features(f, window, eps)
    return gram(X), SelfCache(wcache)


def self_correlation_backward(dR, cache: SelfCache):
    """Gradient of the self-correlation with respect to ``f``: (N, K, M, M) -> (N, C, H, W)."""
    dX = gram_backward(dR, cache.features.xhat)
    return window_features_backward(dX, cache.features)


def self_correlation(f, window=None, eps=1e-6):
    """``SC(f, window) -> (N, K, M, M)`` (SPEC section 2). See ``self_correlation_forward``."""
    return self_correlation_forward(f, window, eps)[0]


# --------------------------------------------------------------------------- cross-correlation


class CrossCache(NamedTuple):
    features1: WindowCache
    features2: WindowCache


def check_pair(f1, f2, names=("f1", "f2")) -> None:
    """Raise ``ValueError`` unless two feature maps have the same 4-d shape."""
    s1 = check_feature(f1, names[0])
    s2 = check_feature(f2, names[1])
    if s1 != s2:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {s1} and {s2}")


def cross_correlation_forward(f1, f2, window=None, eps=1e-6):
    """Cross-correlation and its cache.

    Parameters
    ----------
    f1, f2 : arrays (N, C, H, W) of the same shape
    window : int or None
    eps : float

    Returns
    -------
    R : array (N, K, M, M), ``R[n, k, i, j] = <fhat1[n, :, p_ki], fhat2[n, :, p_kj]>``
    cache : CrossCache

    Notes
    -----
    ``R = X1 X2^T``; ``dX1 = dR X2``, ``dX2 = dR^T X1``.
    """
    check_pair(f1, f2)
    X1, c1 = window_features(f1, window, eps)
    X2, c2 = window_features(f2, window, eps)
    return gram(X1, X2), CrossCache(c1, c2)


def cross_correlation_backward(dR, cache: CrossCache):
    """Gradients of the cross-correlation: (N, K, M, M) -> (df1, df2), each (N, C, H, W)."""
    dX1, dX2 = gram_backward(dR, cache.features1.xhat, cache.features2.xhat)
    return window_features_backward(dX1, cache.features1), window_features_backward(dX2, cache.features2)


def cross_correlation(f1, f2, window=None, eps=1e-6):
    """``CC(f1, f2, window) -> (N, K, M, M)`` (SPEC section 2). See ``cross_correlation_forward``."""
    return cross_correlation_forward(f1, f2, window, eps)[0]


# --------------------------------------------------------------------------- global correlation


class GlobalCache(NamedTuple):
    ghat: object  # (B, C) normalised pooled features
    inv_norm: object  # (B, 1)
    shape: tuple  # (B, C, H, W)


def global_vectors(f, eps=1e-6):
    """The normalised pooled vectors ``ghat (B, C)`` of a batch, the factor of ``GC = ghat ghat^T``.

    ``g[b] = mean_hw f[b]``, ``ghat[b] = g[b] / sqrt(|g[b]|^2 + eps)``; each row depends on
    its own image only, so data-parallel ranks compute theirs and gather them
    (``hicd_loss(..., comm=)``). Returns ``(ghat, cache)``.
    """
    xp = array_namespace(f)
    shape = check_feature(f, "f")
    g = xp.mean(f, axis=(2, 3))
    ghat, inv_norm = _normalize(g, eps, xp=xp)
    return ghat, GlobalCache(ghat, inv_norm, shape)


def global_vectors_backward(dghat, cache: GlobalCache):
    """Gradient of ``global_vectors``: ``dghat (B, C) -> df (B, C, H, W)``."""
    xp = array_namespace(dghat)
    B, C, H, W = cache.shape
    dg = _normalize_backward(dghat, cache.ghat, cache.inv_norm, xp=xp) * (1.0 / (H * W))
    return xp.reshape(dg, (B, C, 1, 1)) * xp.ones((1, 1, H, W), dtype=dg.dtype, device=device(dg))


def global_correlation_forward(f, eps=1e-6):
    """Global (batch) correlation and its cache.

    Parameters
    ----------
    f : array (B, C, H, W)
    eps : float

    Returns
    -------
    R : array (B, B), ``R[a, b] = <ghat[a], ghat[b]>`` with ``g[b] = mean_hw f[b]``
    cache : GlobalCache

    Notes
    -----
    The mean is of the raw features, normalisation comes after it. Backward:
    ``dghat = (dR + dR^T) ghat``, ``dg`` by the normalisation's Jacobian, and
    ``df[b, c, h, w] = dg[b, c] / (H W)``.
    """
    ghat, cache = global_vectors(f, eps)
    return gram(ghat), cache


def global_correlation_backward(dR, cache: GlobalCache):
    """Gradient of the global correlation: (B, B) -> (B, C, H, W)."""
    return global_vectors_backward(gram_backward(dR, cache.ghat), cache)


def global_correlation(f, eps=1e-6):
    """``GC(f) -> (B, B)`` (SPEC section 2). See ``global_correlation_forward``."""
    return global_correlation_forward(f, eps)[0]

