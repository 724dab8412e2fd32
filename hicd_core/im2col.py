"""The im2col machinery that the plain convolution (``functional``) and its fast layouts (``conv_layouts``) share.

``im2col`` stacks a padded image's strided windows as columns, ``col2im`` is its adjoint
(docs/MATH.md 7.1); ``batched_forward`` and ``weight_grad`` are the plain convolution's
products. Kept apart so that neither convolution module imports the other's way back.
"""

from __future__ import annotations

from .backend import device

__all__ = ["contiguous", "pad", "offset", "im2col", "col2im", "batched_forward", "weight_grad"]


def contiguous(x, *, xp):
    """A C-ordered copy of a permuted array (a reshape to 1-d must copy, then a free reshape back)."""
    return xp.reshape(xp.reshape(x, (-1,)), x.shape)


def pad(x, padding, *, xp):
    """Zero padding of the last two axes."""
    if not padding:
        return x
    *lead, H, W = x.shape
    xpad = xp.zeros((*lead, H + 2 * padding, W + 2 * padding), dtype=x.dtype, device=device(x))
    xpad[..., padding : padding + H, padding : padding + W] = x
    return xpad


def offset(i, j, stride, Ho, Wo):
    """The strided window of kernel offset (i, j) over the last two (padded) axes."""
    return (..., slice(i, i + stride * (Ho - 1) + 1, stride), slice(j, j + stride * (Wo - 1) + 1, stride))


def im2col(x, kh, kw, stride, padding, Ho, Wo, *, xp, axis=2):
    """Stack the kh*kw strided windows of the padded last two axes at ``axis``.

    With ``x (N, C, H, W)`` and ``axis=2``: ``(N, C*kh*kw, Ho*Wo)`` (batched layout);
    with ``x (C, N, H, W)`` and ``axis=1``: ``(C*kh*kw, N*Ho*Wo)`` (merged layout).
    """
    A, B = x.shape[:2]
    xpad = pad(x, padding, xp=xp)
    cols = xp.stack([xpad[offset(i, j, stride, Ho, Wo)] for i in range(kh) for j in range(kw)], axis=axis)
    if axis == 2:
        return xp.reshape(cols, (A, B * kh * kw, Ho * Wo))
    return xp.reshape(cols, (A * kh * kw, B * Ho * Wo))


def col2im(dcols, lead_shape, H, W, kh, kw, stride, padding, Ho, Wo, *, xp, axis=2):
    """Adjoint of ``im2col``: scatter-add every kernel offset's window back (docs/MATH.md 7.1)."""
    A, B = lead_shape
    split = (A, B, kh * kw, Ho, Wo) if axis == 2 else (A, kh * kw, B, Ho, Wo)
    dcols = xp.reshape(dcols, split)
    dxpad = xp.zeros((A, B, H + 2 * padding, W + 2 * padding), dtype=dcols.dtype, device=device(dcols))
    for i in range(kh):
        for j in range(kw):
            # windows of different offsets overlap, hence one += per offset (never fancy-index +=)
            part = dcols[:, :, i * kw + j, ...] if axis == 2 else dcols[:, i * kw + j, ...]
            dxpad[offset(i, j, stride, Ho, Wo)] += part
    if padding:
        return dxpad[..., padding : padding + H, padding : padding + W]
    return dxpad


def batched_forward(x, weight, bias, stride, padding, Ho, Wo, *, xp):
    """The plain im2col convolution, image by image: ``cols (N, C kh kw, Ho Wo)``, ``y = W cols (+ b)``."""
    N, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    if kh == kw == 1 and stride == 1 and padding == 0:
        cols = xp.reshape(x, (N, C, H * W))
    else:
        cols = im2col(x, kh, kw, stride, padding, Ho, Wo, xp=xp)
    y = xp.matmul(xp.reshape(weight, (O, C * kh * kw)), cols)
    if bias is not None:
        y = y + xp.reshape(bias, (O, 1))
    return xp.reshape(y, (N, O, Ho, Wo)), cols


def weight_grad(dy2, cols, shape, *, xp):
    """``sum_n dy2[n] cols[n]^T`` for ``dy2 (N, O, L)``, ``cols (N, K, L)``, reshaped to ``shape``.

    Computed as ``(sum_n cols[n] dy2[n]^T)^T``: OpenBLAS runs the product faster with the
    long side (K = C kh kw) as rows than with O rows (measured in docs/perf/HISTORY.md).
    """
    dwt = xp.sum(xp.matmul(cols, xp.matrix_transpose(dy2)), axis=0)  # (K, O)
    return xp.reshape(xp.matrix_transpose(dwt), shape)
