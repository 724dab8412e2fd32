"""Stateless layer pairs with hand-derived backward passes.

Every layer is ``thing_forward(x, params..., *, options) -> (y, cache)`` and
``thing_backward(dy, cache) -> gradients`` (CS231n style). Caches are small named
tuples holding exactly what the backward needs; nothing here keeps state, writes
into ``dy``, an input or a cache, unless a caller says that it may (BatchNorm's
``overwrite_x`` and ``overwrite_dy``, which ``cbr_forward`` / ``cbr_backward`` give for
arrays they allocated themselves). Arrays are channel-first ``(N, C, H, W)``; the
code runs on any array-API namespace (NumPy, CuPy, array-api-strict).
Derivations: ``docs/MATH.md`` section 7.

``conv2d_forward`` / ``conv2d_backward`` here are the plain im2col convolution (the
"batched" layout); the faster layouts of the same product, chosen by their ``layout=``
keyword, live in ``hicd_core/conv_layouts.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import conv_layouts
from .backend import (array_namespace, conv_thread_count, device, from_host, is_cupy_namespace, is_numpy_namespace,
                      mutable_namespace)
from .im2col import batched_forward, col2im, im2col, weight_grad

__all__ = [
    "conv2d_forward",
    "conv2d_backward",
    "im2col",
    "col2im",
    "channel_sum",
    "batchnorm2d_forward",
    "batchnorm2d_backward",
    "relu_forward",
    "relu_backward",
    "absdiff_forward",
    "absdiff_backward",
    "concat_forward",
    "concat_backward",
    "upsample2x_forward",
    "upsample2x_backward",
    "maxpool2x2_forward",
    "maxpool2x2_backward",
    "conv_transpose2d_forward",
    "conv_transpose2d_backward",
    "dropout2d_forward",
    "dropout2d_backward",
    "dropout2d_mask",
    "bce_with_logits",
    "soft_dice",
    "sigmoid",
]


# --------------------------------------------------------------------------- conv2d


#: The im2col layouts of ``conv2d_forward(..., layout=...)``. "batched": per image, ``cols (N, C kh kw, Ho Wo)``
#: and batched matmuls. "merged": the batch folded into the pixel axis, ``cols (C kh kw,
#: N Ho Wo)``, one large matmul per product at the cost of a transposed copy of the input,
#: output and their gradients. "flat": like "batched", but "same" convolutions (stride 1,
#: odd square kernel, padding (k - 1) / 2) take their windows from the padded image with its
#: rows flattened, where every window is one contiguous run (docs/KERNELS.md); they keep
#: only that padded image for the backward pass, whose weight and input gradients share
#: one im2col of ``dy``, and they work a few images at a time so that each block's copies
#: are still in the CPU cache when its products read them; 3x3 stride-2 convolutions of
#: even-sized inputs run the "phases" algorithm instead: the batched forward, the input
#: gradient by output phases instead of a col2im. Any other shape runs "batched".
#: "auto": merged on CuPy, flat elsewhere (docs/PERFORMANCE.md has the measurements).
#: A convolution's cache says which algorithm ran (``cache.layout``: "batched", "merged",
#: "flat" or "phases").
CONV_LAYOUTS = ("auto", "batched", "merged", "flat")


class ConvCache(NamedTuple):
    """What the plain ("batched") convolution's backward needs; the fast layouts of
    ``conv_layouts`` have cache types of their own, each with its ``layout`` name."""

    cols: object  # (N, C*kh*kw, Ho*Wo); a 1x1 convolution's input itself, (N, C, H*W)
    weight: object  # (O, C, kh, kw)
    x_shape: tuple
    stride: int
    padding: int
    has_bias: bool
    layout = "batched"  # the algorithm that ran (a class attribute, not a field)


def _layout(xp, kh, kw, stride, padding, H, W, layout="auto"):
    """The layout one convolution takes: ``layout`` resolved for this namespace and shape.

    The returned name is the algorithm that runs (each has its own cache type). Asking for
    "flat" asks for NumPy's fast family: the "flat" algorithm for "same" convolutions, "phases"
    for 3x3, stride-2, padding-1 convolutions of even-sized inputs (the batched forward pass,
    the input gradient by output phases), "batched" for any other.
    """
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"conv layout must be one of {CONV_LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = "merged" if is_cupy_namespace(xp) else "flat"
    same = stride == 1 and kh == kw == 2 * padding + 1 and kh > 1
    halving = stride == 2 and kh == kw == 3 and padding == 1 and H % 2 == 0 and W % 2 == 0
    if layout == "flat":  # NumPy's fast family: its algorithm for this shape, or the plain one
        layout = "flat" if same else "phases" if halving else "batched"
    return layout


def _conv_out(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def conv2d_forward(x, weight, bias=None, *, stride=1, padding=0, layout="auto"):
    """2-d convolution (cross-correlation, as in deep-learning frameworks).

    Parameters
    ----------
    x : array (N, C, H, W)
    weight : array (O, C, kh, kw)
    bias : array (O,) or None
    stride, padding : int
        Same in both spatial directions; zero padding.
    layout : one of ``CONV_LAYOUTS``
        How the im2col products are laid out (the same numbers up to rounding; see
        ``CONV_LAYOUTS``); the backward pass follows the cache's layout.

    Returns
    -------
    y : array (N, O, Ho, Wo), ``Ho = (H + 2 padding - kh) // stride + 1``
    cache : ConvCache

    Notes
    -----
    ``y[n, o] = sum_{c, i, j} weight[o, c, i, j] xpad[n, c, s*y + i, s*x + j] + bias[o]``,
    computed as ``W (O, C kh kw) @ cols`` (im2col, laid out per ``layout``).
    Backward: ``dW = dy cols^T`` (summed over images), ``db = sum dy``,
    ``dcols = W^T dy`` scattered back by the adjoint of im2col.
    """
    xp = array_namespace(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"conv2d expects x (N, C, H, W) and weight (O, C, kh, kw), got {tuple(x.shape)} and {tuple(weight.shape)}")
    N, C, H, W = x.shape
    O, Cw, kh, kw = weight.shape
    if Cw != C:
        raise ValueError(f"conv2d: x has {C} channels but weight {tuple(weight.shape)} expects {Cw}")
    if bias is not None and tuple(bias.shape) != (O,):
        raise ValueError(f"conv2d: bias must have shape ({O},), got {tuple(bias.shape)}")
    if stride < 1 or padding < 0:
        raise ValueError(f"conv2d: stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    Ho, Wo = _conv_out(H, kh, stride, padding), _conv_out(W, kw, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv2d: kernel {kh}x{kw} does not fit input {tuple(x.shape)} with padding {padding}")
    layout = _layout(xp, kh, kw, stride, padding, H, W, layout)
    if layout != "batched":  # the fast forms of the same product (hicd_core/conv_layouts.py)
        return conv_layouts.FORWARD[layout](x, weight, bias, stride, padding, Ho, Wo, xp=xp)
    y, cols = batched_forward(x, weight, bias, stride, padding, Ho, Wo, xp=xp)
    return y, ConvCache(cols, weight, (N, C, H, W), stride, padding, bias is not None)


def conv2d_backward(dy, cache: ConvCache, *, input_grad=True):
    """Gradients of ``conv2d_forward``: ``dy (N, O, Ho, Wo) -> (dx, dweight, dbias or None)``.

    ``input_grad=False`` skips ``dx`` (returned as None), e.g. for a network's first layer.
    """
    xp = array_namespace(dy)
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = cache.weight.shape
    H, W = cache.x_shape[2:]
    dbias = channel_sum(dy, xp=xp) if cache.has_bias else None
    if cache.layout != "batched":  # the fast forms (hicd_core/conv_layouts.py)
        return conv_layouts.BACKWARD[cache.layout](dy, cache, input_grad, dbias, xp=xp)
    w2 = xp.reshape(cache.weight, (O, C * kh * kw))
    dy2 = xp.reshape(dy, (N, O, Ho * Wo))
    dweight = weight_grad(dy2, cache.cols, cache.weight.shape, xp=xp)
    if not input_grad:
        return None, dweight, dbias
    dcols = xp.matmul(xp.matrix_transpose(w2), dy2)
    if kh == kw == 1 and cache.stride == 1 and cache.padding == 0:
        dx = xp.reshape(dcols, cache.x_shape)
    else:
        dx = col2im(dcols, (N, C), H, W, kh, kw, cache.stride, cache.padding, Ho, Wo, xp=xp)
    return dx, dweight, dbias


# --------------------------------------------------------------------------- batchnorm2d


class BatchNormCache(NamedTuple):
    centred: object  # (N, C, H, W) input minus the mean used (batch or running)
    inv_std: object  # (1, C, 1, 1); xhat = centred * inv_std
    gamma: object  # (C,)
    training: bool
    sync: object = None  # the communicator of a synchronised BatchNorm (its backward sums over ranks too)


def channel_sum(x, *, xp):
    """Per-channel sum of (N, C, H, W) -> (C,), as a matrix-vector product then a small sum.

    Equal to ``xp.sum(x, axis=(0, 2, 3))``; a BLAS / cuBLAS product with a ones
    vector is several times faster than NumPy's or CuPy's reduction over the
    non-contiguous axes (0, 2, 3).
    """
    return xp.sum(_image_channel_sums(x, xp=xp), axis=0)


def _image_channel_sums(x, *, xp):
    """Per-image, per-channel sums of (N, C, H, W) -> (N, C): one matrix-vector product per image."""
    N, C, H, W = x.shape
    ones = xp.ones((H * W, 1), dtype=x.dtype, device=device(x))
    return xp.reshape(xp.matmul(xp.reshape(x, (N, C, H * W)), ones), (N, C))


# The layers between the convolutions (BatchNorm, ReLU) follow ``backend.conv_threads``: on NumPy
# with more than one thread their passes run image block by image block on the host threads
# (NumPy's elementwise kernels use one core each). Every image's values are computed by the same
# operations as at once, and per-channel sums still add the same per-image sums in the same
# order, so the results do not depend on the thread count.


def _image_split(x, xp):
    """``(blocks, threads)`` of ``x``'s images for the host threads, or None: all at once (one
    thread, not NumPy, a single image)."""
    if x.shape[0] < 2 or conv_thread_count() < 2 or not is_numpy_namespace(xp):
        return None
    return conv_layouts._thread_blocks(x.shape[0], math.prod(x.shape[1:]) * (xp.finfo(x.dtype).bits // 8), xp=xp)


def _by_images(fn, arrays, split, *, xp):
    """``fn(*arrays)`` of arrays shaped like ``arrays[0]``: at once (``split`` None), or block by
    block of images on the host threads, written into one output."""
    if split is None:
        return fn(*arrays)
    out = xp.empty_like(arrays[0])

    def job(s, e):
        out[s:e, ...] = fn(*(a[s:e, ...] for a in arrays))

    conv_layouts._in_blocks(job, *split, xp=xp)
    return out


def _channel_sums(fn, arrays, split, *, xp):
    """``channel_sum(fn(*arrays))``, by image blocks on the host threads where ``split`` says so."""
    if split is None:
        return channel_sum(fn(*arrays), xp=xp)
    N, C = arrays[0].shape[:2]
    per_image = xp.empty((N, C), dtype=arrays[0].dtype)

    def job(s, e):
        per_image[s:e, ...] = _image_channel_sums(fn(*(a[s:e, ...] for a in arrays)), xp=xp)

    conv_layouts._in_blocks(job, *split, xp=xp)
    return xp.sum(per_image, axis=0)


def _over_images(job, n, split, *, xp):
    """``job(s, e)`` for the images ``[s, e)`` of a batch of ``n``: once for all (``split`` None), or
    block by block on the host threads (``job`` writes its block's part of a result in place)."""
    if split is None:
        job(0, n)
    else:
        conv_layouts._in_blocks(job, *split, xp=xp)


def _centred(x, mean, split, overwrite, *, xp):
    """``x - mean``, written into ``x`` when ``overwrite``."""
    if not overwrite:
        return _by_images(lambda a: a - mean, (x,), split, xp=xp)

    def job(s, e):
        block = x[s:e, ...]
        block -= mean

    _over_images(job, x.shape[0], split, xp=xp)
    return x


def batchnorm2d_forward(x, gamma, beta, running_mean, running_var, *, training, momentum=0.1, eps=1e-5, sync=None,
                        overwrite_x=False):
    """Batch normalisation over (N, H, W) per channel.

    Parameters
    ----------
    x : array (N, C, H, W)
    gamma, beta : arrays (C,)
    running_mean, running_var : arrays (C,)
    training : bool
        True: normalise with the batch statistics and return updated running
        statistics; False: normalise with the running statistics.
    momentum, eps : float
        ``running = (1 - momentum) running + momentum batch`` (the running variance
        takes the unbiased batch variance), ``eps`` inside the square root; as in
        common frameworks.
    sync : communicator, optional
        Synchronised BatchNorm over data-parallel ranks (``hicd_core.parallel``): the
        batch statistics are those of the global batch (every rank's shard, all of one
        shape), from per-channel sums added over ranks (``sync.allreduce_sum``), and
        the backward sums over ranks as well (docs/MATH.md, section 8). None: this
        process's batch alone.
    overwrite_x : bool
        Whether ``x`` may be overwritten (by its centred values, which the cache keeps), as
        SciPy's ``overwrite_a``: for a caller that allocated ``x`` and needs it no more
        (``cbr_forward``). Honoured on NumPy and CuPy when ``x`` and the parameters share a
        dtype; the results are the same either way.

    Returns
    -------
    y : array (N, C, H, W)
    cache : BatchNormCache
    new_running_mean, new_running_var : arrays (C,) (new arrays; the inputs are untouched)

    Notes
    -----
    Training: ``xhat = (x - mu) / sqrt(var + eps)`` with biased batch variance
    (two passes: the mean first, then the mean of squared deviations),
    ``y = gamma xhat + beta``. With ``m = N H W`` and ``g = dy gamma``:
    ``dx = inv_std / m * (m g - sum g - xhat sum(g xhat))``,
    ``dgamma = sum(dy xhat)``, ``dbeta = sum(dy)``. Evaluation: ``dx = g inv_std``.
    """
    xp = array_namespace(x, gamma, beta, running_mean, running_var)
    if x.ndim != 4:
        raise ValueError(f"batchnorm2d expects x of shape (N, C, H, W), got {tuple(x.shape)}")
    C = x.shape[1]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        if tuple(a.shape) != (C,):
            raise ValueError(f"batchnorm2d: {name} must have shape ({C},), got {tuple(a.shape)}")
    shape = (1, C, 1, 1)
    split = _image_split(x, xp) if gamma.dtype == x.dtype else None  # the output takes x's dtype
    # in place: x's memory takes the centred values, and y's first holds their squares
    in_place = mutable_namespace(xp) and all(a.dtype == x.dtype for a in (gamma, beta, running_mean, running_var))
    y = None
    if training:
        m = x.shape[0] * x.shape[2] * x.shape[3] * (1 if sync is None else sync.size)
        if m < 2:
            raise ValueError(f"batchnorm2d in training needs more than one value per channel, got input {tuple(x.shape)}")
        def total(fn, a):  # per-channel sums of fn(a) over this batch, or over the global batch across ranks
            sums = _channel_sums(fn, (a,), split, xp=xp)
            return sums if sync is None else sync.allreduce_sum(sums)

        mean = total(lambda a: a, x) * (1.0 / m)
        centred = _centred(x, xp.reshape(mean, shape), split, overwrite_x and in_place, xp=xp)
        if in_place:
            y = _by_images(lambda c: c * c, (centred,), split, xp=xp)
            var = total(lambda q: q, y) * (1.0 / m)
        else:
            var = total(lambda c: c * c, centred) * (1.0 / m)
        inv_std = 1.0 / xp.sqrt(var + eps)
        new_mean = running_mean * (1.0 - momentum) + mean * momentum
        new_var = running_var * (1.0 - momentum) + var * (momentum * m / (m - 1))
    else:
        inv_std = 1.0 / xp.sqrt(running_var + eps)
        centred = _centred(x, xp.reshape(running_mean, shape), split, overwrite_x and in_place, xp=xp)
        new_mean, new_var = running_mean, running_var
    # y = gamma xhat + beta with xhat = centred inv_std, folded into one scale per channel
    scale, shift = xp.reshape(gamma * inv_std, shape), xp.reshape(beta, shape)
    if in_place:
        y = xp.empty_like(centred) if y is None else y

        def affine(s, e):
            block = y[s:e, ...]
            xp.multiply(centred[s:e, ...], scale, out=block)
            block += shift

        _over_images(affine, x.shape[0], split, xp=xp)
    else:
        y = _by_images(lambda c: c * scale + shift, (centred,), split, xp=xp)
    return y, BatchNormCache(centred, xp.reshape(inv_std, shape), gamma, training, sync if training else None), \
        new_mean, new_var


def batchnorm2d_backward(dy, cache: BatchNormCache, *, overwrite_dy=False):
    """Gradients of ``batchnorm2d_forward``: ``dy -> (dx, dgamma, dbeta)``.

    With ``xhat = centred inv_std`` and ``m = N H W``, per channel:
    ``dgamma = inv_std sum(dy centred)``, ``dbeta = sum(dy)`` and
    ``dx = gamma inv_std (dy - dbeta / m - xhat dgamma / m)``, evaluated as
    ``dy a + centred b + c`` with per-channel ``a, b, c`` (fewer full passes).

    Synchronised (``cache.sync``): ``dx`` takes the sums of ``dy`` and ``dy centred``
    over every rank's shard and ``m`` of the global batch (one all-reduce of both),
    while the returned ``dgamma`` and ``dbeta`` are this rank's parts, which the
    optimiser's gradient all-reduce adds up like every other parameter's.

    ``overwrite_dy``: ``dy`` may be overwritten (it becomes ``dx``), as ``overwrite_x`` of the
    forward: honoured in training on NumPy and CuPy when ``dy`` and the cache share a dtype.
    """
    xp = array_namespace(dy)
    C = dy.shape[1]
    shape = (1, C, 1, 1)
    inv_std = xp.reshape(cache.inv_std, (C,))
    split = _image_split(dy, xp)
    in_place = (cache.training and mutable_namespace(xp)
                and all(t.dtype == dy.dtype for t in (cache.centred, cache.inv_std, cache.gamma)))
    dbeta = _channel_sums(lambda g: g, (dy,), split, xp=xp)
    if in_place:  # the products dy centred stay, to hold centred b below
        products = _by_images(lambda g, c: g * c, (dy, cache.centred), split, xp=xp)
        dgamma = _channel_sums(lambda q: q, (products,), split, xp=xp) * inv_std
    else:
        dgamma = _channel_sums(lambda g, c: g * c, (dy, cache.centred), split, xp=xp) * inv_std
    a = cache.gamma * inv_std
    if not cache.training:
        return _by_images(lambda g: g * xp.reshape(a, shape), (dy,), split, xp=xp), dgamma, dbeta
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    sum_dy, sum_dgamma = dbeta, dgamma
    if cache.sync is not None:
        both = cache.sync.allreduce_sum(xp.concat([dbeta, dgamma]))
        sum_dy, sum_dgamma, m = both[:C], both[C:], m * cache.sync.size
    b = -a * inv_std * sum_dgamma * (1.0 / m)
    c = -a * sum_dy * (1.0 / m)
    a, b, c = xp.reshape(a, shape), xp.reshape(b, shape), xp.reshape(c, shape)
    if not in_place:
        return _by_images(lambda g, centred: g * a + centred * b + c, (dy, cache.centred), split, xp=xp), \
            dgamma, dbeta
    dx = dy if overwrite_dy else xp.empty_like(dy)

    def job(s, e):  # dy a + centred b + c, added in that order
        block, spare = dx[s:e, ...], products[s:e, ...]
        xp.multiply(dy[s:e, ...], a, out=block)
        xp.multiply(cache.centred[s:e, ...], b, out=spare)
        block += spare
        block += c

    _over_images(job, dy.shape[0], split, xp=xp)
    return dx, dgamma, dbeta


# --------------------------------------------------------------------------- elementwise and shape layers


class ReluCache(NamedTuple):
    y: object  # the output; y > 0 exactly where x > 0, and it is kept alive downstream anyway


def relu_forward(x):
    """``y = max(x, 0)``; backward ``dx = dy [x > 0]`` (the subgradient at 0 is 0)."""
    xp = array_namespace(x)
    y = _by_images(lambda a: xp.maximum(a, 0.0), (x,), _image_split(x, xp), xp=xp)
    return y, ReluCache(y)


def _relu_of_own(x):
    """``relu_forward(x)`` for an ``x`` that the caller allocated and no longer needs: written into
    ``x`` where the namespace allows (the same values, without a new array)."""
    xp = array_namespace(x)
    if not mutable_namespace(xp):
        return relu_forward(x)
    _over_images(lambda s, e: xp.maximum(x[s:e, ...], 0.0, out=x[s:e, ...]), x.shape[0], _image_split(x, xp), xp=xp)
    return x, ReluCache(x)


def relu_backward(dy, cache: ReluCache):
    xp = array_namespace(dy)
    # a multiply by the 0/1 mask is several times faster than where() in NumPy
    return _by_images(lambda g, y: g * _factor(y > 0, dy.dtype, xp=xp), (dy, cache.y), _image_split(dy, xp), xp=xp)


def _factor(mask, dtype, *, xp):
    """A boolean ``mask`` as a factor of ``dtype`` arrays: NumPy and CuPy multiply by the mask itself
    (True as 1.0, the same values without a cast pass), other namespaces by its 0/1 cast."""
    return mask if mutable_namespace(xp) else xp.astype(mask, dtype)


# --------------------------------------------------------------------------- conv-BN-ReLU (SPEC 4's CBR)


class CBRCache(NamedTuple):
    conv: ConvCache
    bn: BatchNormCache
    relu: ReluCache


def cbr_forward(x, weight, bias, gamma, beta, running_mean, running_var, *, stride=1, training, momentum=0.1,
                eps=1e-5, layout="auto", sync=None):
    """``CBR`` of SPEC section 4: 3x3 convolution (padding 1; ``bias`` None, as the networks use it, or an
    array) -> BatchNorm2d -> ReLU.

    Returns
    -------
    y : array (N, O, Ho, Wo)
    cache : CBRCache (for ``cbr_backward``)
    running_mean, running_var : the new running statistics (the given ones in evaluation mode); they
        are returned, never written: keeping them is the caller's business.
    """
    y, conv_cache = conv2d_forward(x, weight, bias, stride=stride, padding=1, layout=layout)
    y, bn_cache, mean, var = batchnorm2d_forward(y, gamma, beta, running_mean, running_var, training=training,
                                                 momentum=momentum, eps=eps, sync=sync, overwrite_x=True)
    y, relu_cache = _relu_of_own(y)  # BatchNorm's output is this function's own
    return y, CBRCache(conv_cache, bn_cache, relu_cache), mean, var


def cbr_backward(dy, cache: CBRCache, *, input_grad=True):
    """Gradients of ``cbr_forward``: ``(dx, dweight, dbias, dgamma, dbeta)`` (dx None with ``input_grad=False``,
    dbias None without a bias)."""
    dy = relu_backward(dy, cache.relu)
    dy, dgamma, dbeta = batchnorm2d_backward(dy, cache.bn, overwrite_dy=True)  # ReLU's dx is this function's own
    dx, dweight, dbias = conv2d_backward(dy, cache.conv, input_grad=input_grad)
    return dx, dweight, dbias, dgamma, dbeta


def cbr_folded_forward(x, weight, bias, gamma, beta, running_mean, running_var, *, stride=1, eps=1e-5,
                       layout="auto"):
    """Evaluation-mode ``CBR`` with the BatchNorm folded into the convolution (no cache; for inference).

    ``gamma (W * x + b - mean) / sqrt(var + eps) + beta = (s W) * x + (s (b - mean) + beta)`` with
    ``s = gamma / sqrt(var + eps)`` per output channel (docs/MATH.md 7.3): equal to ``cbr_forward`` with
    ``training=False`` up to rounding, without BatchNorm's passes over the activations.
    """
    xp = array_namespace(x, weight)
    s = gamma / xp.sqrt(running_var + eps)
    folded_weight = weight * xp.reshape(s, (-1, 1, 1, 1))
    folded_bias = (-running_mean if bias is None else bias - running_mean) * s + beta
    y, _ = conv2d_forward(x, folded_weight, folded_bias, stride=stride, padding=1, layout=layout)
    return relu_forward(y)[0]


class SignCache(NamedTuple):
    sign: object


def absdiff_forward(a, b):
    """``y = |a - b|``; backward ``da = sign(a - b) dy``, ``db = -da`` (sign(0) = 0)."""
    xp = array_namespace(a, b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"absdiff: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    diff = a - b
    return xp.abs(diff), SignCache(xp.sign(diff))


def absdiff_backward(dy, cache: SignCache):
    da = dy * cache.sign
    return da, -da


class ConcatCache(NamedTuple):
    sizes: tuple


def concat_forward(arrays, axis=1):
    """Concatenate along ``axis`` (channels by default); backward splits ``dy``."""
    xp = array_namespace(*arrays)
    return xp.concat(list(arrays), axis=axis), ConcatCache(tuple((a.shape[axis], axis) for a in arrays))


def concat_backward(dy, cache: ConcatCache):
    out, start = [], 0
    for size, axis in cache.sizes:
        index = [slice(None)] * dy.ndim
        index[axis] = slice(start, start + size)
        out.append(dy[tuple(index)])
        start += size
    return out


def upsample2x_forward(x):
    """Nearest-neighbour x2 upsampling: ``y[n, c, 2h + a, 2w + b] = x[n, c, h, w]``."""
    xp = array_namespace(x)
    N, C, H, W = x.shape
    # columns doubled, then rows: two stacks are several times faster in NumPy than one
    # copy of a broadcast view with two length-2, stride-0 axes
    rows = xp.reshape(xp.stack([x, x], axis=-1), (N, C, H, 2 * W))
    return xp.reshape(xp.stack([rows, rows], axis=3), (N, C, 2 * H, 2 * W)), None


def upsample2x_backward(dy, cache=None):
    """Adjoint of nearest x2 upsampling: the sum over each 2 x 2 block.

    Written as two strided adds (rows, then columns): NumPy's reduction over the
    length-2 axes of a reshaped view is over ten times slower.
    """
    rows = dy[..., 0::2, :] + dy[..., 1::2, :]
    return rows[..., 0::2] + rows[..., 1::2]


# --------------------------------------------------------------------------- FC-Siam-diff's layers


class MaxPoolCache(NamedTuple):
    picks: tuple  # four masks (N, C, H/2, W/2), 0/1 or boolean: which of the window's (0,0), (0,1), (1,0), (1,1) won


def _quarters(x):
    """The four phases ``x[..., a::2, b::2]`` of a 2 x 2 grid, in the order (0,0), (0,1), (1,0), (1,1)."""
    return (x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2])


def _interleave(q00, q01, q10, q11, *, xp):
    """Inverse of ``_quarters``: four (N, C, h, w) phases woven into (N, C, 2h, 2w)."""
    N, C, h, w = q00.shape
    top = xp.reshape(xp.stack([q00, q01], axis=-1), (N, C, h, 2 * w))
    bottom = xp.reshape(xp.stack([q10, q11], axis=-1), (N, C, h, 2 * w))
    return xp.reshape(xp.stack([top, bottom], axis=3), (N, C, 2 * h, 2 * w))


def maxpool2x2_forward(x):
    """2 x 2 max pooling with stride 2: ``y[n, c, i, j] = max_{a, b in {0, 1}} x[n, c, 2i + a, 2j + b]``.

    Parameters
    ----------
    x : array (N, C, H, W), H and W even

    Returns
    -------
    y : array (N, C, H/2, W/2)
    cache : MaxPoolCache

    Notes
    -----
    The gradient goes to the window's maximum alone: ``dx[n, c, 2i + a, 2j + b] = dy[n, c, i, j]``
    at the winning position, 0 at the other three. On ties the first position in row-major order
    wins (as PyTorch's ``max_pool2d`` does), so each ``dy`` value is routed exactly once.
    """
    xp = array_namespace(x)
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"maxpool2x2 expects x (N, C, H, W) with even H and W, got {tuple(x.shape)}")
    q = _quarters(x)
    y = xp.maximum(xp.maximum(q[0], q[1]), xp.maximum(q[2], q[3]))
    picks, taken = [], None
    for part in q:  # the first quarter equal to the maximum wins
        hit = part == y
        if taken is not None:
            hit = xp.logical_and(hit, xp.logical_not(taken))
        taken = hit if taken is None else xp.logical_or(taken, hit)
        picks.append(_factor(hit, x.dtype, xp=xp))
    return y, MaxPoolCache(tuple(picks))


def maxpool2x2_backward(dy, cache: MaxPoolCache):
    """Gradient of ``maxpool2x2_forward``: ``dy (N, C, h, w) -> dx (N, C, 2h, 2w)``."""
    xp = array_namespace(dy)
    if not mutable_namespace(xp):
        return _interleave(*(dy * pick for pick in cache.picks), xp=xp)
    N, C, h, w = dy.shape
    dx = xp.empty((N, C, 2 * h, 2 * w), dtype=dy.dtype, device=device(dy))
    for quarter, pick in zip(_quarters(dx), cache.picks):  # each product written into its phase of dx
        xp.multiply(dy, pick, out=quarter)
    return dx


class ConvTransposeCache(NamedTuple):
    x: object  # (N, Cin, H, W), the input (its product with the im2col of dy is the weight gradient)
    weight: object  # (Cin, Cout, k, k)
    stride: int
    padding: int
    has_bias: bool
    layout: str


def conv_transpose2d_forward(x, weight, bias=None, *, stride=2, padding=1, output_padding=1, layout="auto"):
    """Transposed 2-d convolution (PyTorch's ``ConvTranspose2d``): the adjoint of ``conv2d_forward``.

    Parameters
    ----------
    x : array (N, Cin, H, W)
    weight : array (Cin, Cout, k, k) (PyTorch's layout: input channels first)
    bias : array (Cout,) or None
    stride, padding, output_padding : int
        ``output_padding < stride`` extra rows and columns at the bottom and right.
    layout : one of ``CONV_LAYOUTS``
        The layout of the convolution it is the adjoint of; on NumPy, 3x3 stride-2 padding-1
        kernels run the "phases" algorithm (``conv_layouts``), any other shape the plain one.

    Returns
    -------
    y : array (N, Cout, Ho, Wo), ``Ho = (H - 1) stride - 2 padding + k + output_padding``
    cache : ConvTransposeCache

    Notes
    -----
    ``y[n, o, s i + a - p, s j + b - p] += sum_c x[n, c, i, j] weight[c, o, a, b]`` (+ ``bias[o]``):
    ``y = conv2d_input_grad(x)`` of the convolution ``Ho x Wo -> H x W`` with the same ``weight``
    read as ``(O = Cin, C = Cout, k, k)``, i.e. ``col2im(W^T x)``. Its backward is that
    convolution's forward and weight gradient: ``dx = conv2d(dy, weight)``,
    ``dweight = sum_n x[n] im2col(dy[n])^T`` and ``dbias = sum dy`` (docs/MATH.md 7.8).
    """
    xp = array_namespace(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv_transpose2d expects x (N, Cin, H, W) and weight (Cin, Cout, k, k), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    N, C, H, W = x.shape
    Cin, O, k, _ = weight.shape
    if Cin != C:
        raise ValueError(f"conv_transpose2d: x has {C} channels but weight {tuple(weight.shape)} expects {Cin}")
    if bias is not None and tuple(bias.shape) != (O,):
        raise ValueError(f"conv_transpose2d: bias must have shape ({O},), got {tuple(bias.shape)}")
    if stride < 1 or padding < 0 or not 0 <= output_padding < stride:
        raise ValueError(f"conv_transpose2d: need stride >= 1, padding >= 0 and 0 <= output_padding < stride, got "
                         f"stride={stride}, padding={padding}, output_padding={output_padding}")
    Ho, Wo = (H - 1) * stride - 2 * padding + k + output_padding, (W - 1) * stride - 2 * padding + k + output_padding
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_transpose2d: kernel {k}x{k} with padding {padding} leaves no output for {tuple(x.shape)}")
    layout = _layout(xp, k, k, stride, padding, Ho, Wo, layout)
    if layout == "phases":  # the input gradient by output phases (hicd_core/conv_layouts.py)
        y = conv_layouts.halving_input_grad(x, weight, Ho, Wo, xp=xp)
    else:
        dcols = xp.matmul(xp.matrix_transpose(xp.reshape(weight, (C, O * k * k))), xp.reshape(x, (N, C, H * W)))
        y = col2im(dcols, (N, O), Ho, Wo, k, k, stride, padding, H, W, xp=xp)
    if bias is not None:
        y = y + xp.reshape(bias, (O, 1, 1))
    return y, ConvTransposeCache(x, weight, stride, padding, bias is not None, layout)


def conv_transpose2d_backward(dy, cache: ConvTransposeCache, *, input_grad=True):
    """Gradients of ``conv_transpose2d_forward``: ``dy (N, Cout, Ho, Wo) -> (dx, dweight, dbias or None)``."""
    xp = array_namespace(dy)
    # the convolution this layer is the adjoint of, run forward on dy: its output is dx, and its weight
    # gradient with x as the output gradient is this layer's weight gradient (one im2col of dy for both)
    layout = "batched" if cache.layout == "phases" else cache.layout
    dx, conv_cache = conv2d_forward(dy, cache.weight, None, stride=cache.stride, padding=cache.padding,
                                    layout=layout)
    _, dweight, _ = conv2d_backward(cache.x, conv_cache, input_grad=False)
    dbias = channel_sum(dy, xp=xp) if cache.has_bias else None
    return (dx if input_grad else None), dweight, dbias


class DropoutCache(NamedTuple):
    mask: object  # (N, C, 1, 1): 0 for a dropped channel, 1 / (1 - p) for a kept one; None: identity


def dropout2d_mask(rng, shape, p, xp, *, dtype="float32"):
    """The channel mask of ``dropout2d_forward`` for ``(N, C)``, drawn on the host from ``rng``.

    Each (image, channel) is kept with probability ``1 - p`` and then scaled by ``1 / (1 - p)``;
    drawn on the host (a ``numpy.random.Generator``), so NumPy and CuPy runs drop the same channels.
    """
    N, C = shape
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    keep = rng.random((N, C)) >= p
    return xp.reshape(from_host(keep * (1.0 / (1.0 - p)), xp, dtype=dtype), (N, C, 1, 1))


def dropout2d_forward(x, mask):
    """Channel dropout (PyTorch's ``Dropout2d``): ``y = x * mask`` with ``mask (N, C, 1, 1)``.

    ``mask`` from ``dropout2d_mask`` (0 or ``1 / (1 - p)`` per image and channel), or None for the
    identity (evaluation). Backward: ``dx = dy * mask``.
    """
    if mask is None:
        return x, DropoutCache(None)
    if tuple(mask.shape) != (x.shape[0], x.shape[1], 1, 1):
        raise ValueError(f"dropout2d: mask must have shape ({x.shape[0]}, {x.shape[1]}, 1, 1) for x "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    return x * mask, DropoutCache(mask)


def dropout2d_backward(dy, cache: DropoutCache):
    return dy if cache.mask is None else dy * cache.mask


# --------------------------------------------------------------------------- task losses


def sigmoid(z):
    """Logistic function, stable for large |z| (no overflow in exp)."""
    xp = array_namespace(z)
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _valid_mask(target, ignore_index, *, xp):
    if ignore_index is None:
        return None
    return target != ignore_index


def bce_with_logits(logits, target, *, ignore_index=None, pos_weight=None):
    """Binary cross-entropy with logits, mean over the valid pixels, and its gradient.

    Parameters
    ----------
    logits : array (N, 1, H, W) or (N, H, W), float
    target : array of the same number of elements, values {0, 1} (or ``ignore_index``)
    ignore_index : int or None
        Pixels whose target equals it are excluded from the mean.
    pos_weight : float or None
        Weight ``w`` of the change (positive) pixels' term, as PyTorch's
        ``BCEWithLogitsLoss(pos_weight=...)``; None or 1 is the plain loss (SPEC 4).

    Returns
    -------
    loss : 0-d array
    dlogits : array shaped like ``logits``

    Notes
    -----
    ``l(z, t) = -(w t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))
    = (1 - t) z + (1 + (w - 1) t) softplus(-z)`` with
    ``softplus(-z) = max(-z, 0) + log(1 + exp(-|z|))`` (stable for any z);
    ``dl/dz = (1 - t) - (1 + (w - 1) t) sigmoid(-z)``, which is ``sigmoid(z) - t`` at
    ``w = 1``. The mean divides by the number of valid pixels (not by the weights).
    """
    xp = array_namespace(logits, target)
    t = xp.reshape(target, logits.shape)
    valid = _valid_mask(t, ignore_index, xp=xp)
    tf = xp.astype(t, logits.dtype)
    if valid is not None:
        tf = xp.where(valid, tf, xp.zeros_like(tf))
    if pos_weight is None or float(pos_weight) == 1.0:
        per_pixel = xp.maximum(logits, 0.0) - logits * tf + xp.log1p(xp.exp(-xp.abs(logits)))
        grad = sigmoid(logits) - tf
    else:
        w = float(pos_weight)
        if not (math.isfinite(w) and w > 0.0):
            raise ValueError(f"pos_weight must be a positive finite number, got {pos_weight!r}")
        scale = 1.0 + (w - 1.0) * tf
        softplus_neg = xp.maximum(-logits, 0.0) + xp.log1p(xp.exp(-xp.abs(logits)))
        per_pixel = (1.0 - tf) * logits + scale * softplus_neg
        grad = (1.0 - tf) - scale * sigmoid(-logits)
    if valid is not None:
        vf = xp.astype(valid, logits.dtype)
        count = xp.maximum(xp.sum(vf), 1.0)
        return xp.sum(per_pixel * vf) / count, grad * vf / count
    count = float(math.prod(logits.shape))
    return xp.sum(per_pixel) * (1.0 / count), grad * (1.0 / count)


def soft_dice(logits, target, *, smooth=1.0, ignore_index=None):
    """Soft Dice loss on ``sigmoid(logits)`` over the whole batch, and its gradient.

    Notes
    -----
    ``p = sigmoid(z)``, ``I = sum p t``, ``S = sum p + sum t``,
    ``L = 1 - (2 I + s) / (S + s)``; ``dL/dp = -(2 t (S + s) - (2 I + s)) / (S + s)^2``,
    ``dL/dz = dL/dp * p (1 - p)``.
    """
    xp = array_namespace(logits, target)
    t = xp.reshape(target, logits.shape)
    valid = _valid_mask(t, ignore_index, xp=xp)
    tf = xp.astype(t, logits.dtype)
    p = sigmoid(logits)
    if valid is not None:
        vf = xp.astype(valid, logits.dtype)
        tf = tf * vf
        p_used = p * vf
    else:
        vf = None
        p_used = p
    inter = xp.sum(p_used * tf)
    denom = xp.sum(p_used) + xp.sum(tf) + smooth
    loss = 1.0 - (2.0 * inter + smooth) / denom
    dp = -(2.0 * tf * denom - (2.0 * inter + smooth)) / (denom * denom)
    dz = dp * p * (1.0 - p)
    if vf is not None:
        dz = dz * vf
    return loss, dz
