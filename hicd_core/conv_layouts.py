"""The fast forms of ``functional.conv2d``: the same product laid out for speed, each a forward/backward pair.

``functional.conv2d_forward`` / ``conv2d_backward`` hold the plain im2col convolution (the
"batched" layout: one im2col per image, col2im for the input gradient), the one a reader
meets first and the reference the tests hold these to. They call into this module for the
other layouts of ``functional.CONV_LAYOUTS`` (derivations in docs/MATH.md 7.1 and docs/KERNELS.md):

* "merged": the batch folded into the pixel axis, one large product per gradient (CuPy's
  default);
* "flat" ("same" convolutions, stride 1): windows taken from the padded image with its rows
  flattened, both gradients from one im2col of ``dy``;
* "phases" (3x3, stride 2, even sizes): the batched forward and weight gradient, the input
  gradient by output phases instead of a col2im.

NumPy's default asks for "flat" and gets "flat" or "phases" by shape (``functional._layout``).
Each ``*_forward(x, weight, bias, stride, padding, Ho, Wo, *, xp) -> (y, cache)`` returns its
own cache type (``MergedCache``, ``FlatCache``, ``PhasesCache``, each naming its ``layout``),
which is what its ``*_backward(dy, cache, input_grad, dbias, *, xp)`` takes.
"""

from __future__ import annotations

from typing import NamedTuple

from .backend import conv_thread_count, device, is_cupy_namespace, is_numpy_namespace, run_independent
from .im2col import batched_forward, col2im, contiguous, im2col, weight_grad

__all__ = ["FORWARD", "BACKWARD", "MergedCache", "FlatCache", "PhasesCache", "merged_forward", "merged_backward",
           "flat_forward", "flat_backward", "phases_forward", "phases_backward", "FLAT_BLOCK_BYTES", "flat_padded",
           "flat_grid", "flipped_taps", "unflipped_weight_grad", "flat_product_first", "halving_input_grad"]


class MergedCache(NamedTuple):
    cols: object  # (C kh kw, N Ho Wo): the batch in the pixel axis
    weight: object  # (O, C, kh, kw)
    x_shape: tuple
    stride: int
    padding: int
    has_bias: bool
    layout = "merged"


class FlatCache(NamedTuple):
    padded: object  # the padded input with its rows flattened, (N, C, (H + 2p + 1) (W + p) + p)
    weight: object  # (O, C, k, k)
    x_shape: tuple
    padding: int
    has_bias: bool
    layout = "flat"


class PhasesCache(NamedTuple):
    cols: object  # (N, C 9, Ho Wo), as the batched layout's
    weight: object  # (O, C, 3, 3)
    x_shape: tuple
    has_bias: bool
    layout = "phases"

#: "flat" works through the batch in blocks of images whose largest temporary (an im2col
#: matrix or a stack of per-offset products) is about this many bytes, at least one image
#: (on the CPU; on CuPy the batch is one block). Measured on a 2-core EPYC VM
#: (docs/PERFORMANCE.md); tune for other caches.
FLAT_BLOCK_BYTES = 4 << 20


def merged_forward(x, weight, bias, stride, padding, Ho, Wo, *, xp):
    """The batch folded into the pixel axis: ``cols (C kh kw, N Ho Wo)``, one product ``W cols``."""
    N = x.shape[0]
    O, C, kh, kw = weight.shape
    cols = im2col(xp.permute_dims(x, (1, 0, 2, 3)), kh, kw, stride, padding, Ho, Wo, xp=xp, axis=1)
    y = xp.matmul(xp.reshape(weight, (O, C * kh * kw)), cols)  # (O, N Ho Wo)
    if bias is not None:
        y = y + xp.reshape(bias, (O, 1))
    y = contiguous(xp.permute_dims(xp.reshape(y, (O, N, Ho, Wo)), (1, 0, 2, 3)), xp=xp)
    return y, MergedCache(cols, weight, tuple(x.shape), stride, padding, bias is not None)


def merged_backward(dy, cache: MergedCache, input_grad, dbias, *, xp):
    """``dW = dy^T cols^T`` and ``dx = col2im(W^T dy)`` with the batch in the pixel axis."""
    N, O, Ho, Wo = dy.shape
    _, C, kh, kw = cache.weight.shape
    H, W = cache.x_shape[2:]
    dyt = xp.reshape(xp.permute_dims(xp.reshape(dy, (N, O, Ho * Wo)), (1, 0, 2)), (O, N * Ho * Wo))
    dweight = xp.reshape(xp.matmul(dyt, xp.matrix_transpose(cache.cols)), cache.weight.shape)
    if not input_grad:
        return None, dweight, dbias
    dcols = xp.matmul(xp.matrix_transpose(xp.reshape(cache.weight, (O, C * kh * kw))), dyt)  # (C kh kw, N Ho Wo)
    dxt = col2im(dcols, (C, N), H, W, kh, kw, cache.stride, cache.padding, Ho, Wo, xp=xp, axis=1)
    return contiguous(xp.permute_dims(dxt, (1, 0, 2, 3)), xp=xp), dweight, dbias


def flat_forward(x, weight, bias, stride, padding, Ho, Wo, *, xp):
    """A "same" convolution on the flattened padded image, which is all its backward pass keeps of ``x``."""
    padded = flat_padded(x, padding, xp=xp)
    y = _flat_conv(padded, weight, bias, Ho, Wo, x.shape[3] + padding, xp=xp)
    return y, FlatCache(padded, weight, tuple(x.shape), padding, bias is not None)


def phases_forward(x, weight, bias, stride, padding, Ho, Wo, *, xp):
    """The batched forward pass (its cols serve the weight gradient); the backward is where it differs."""
    y, cols = batched_forward(x, weight, bias, stride, padding, Ho, Wo, xp=xp)
    return y, PhasesCache(cols, weight, tuple(x.shape), bias is not None)


def phases_backward(dy, cache: PhasesCache, input_grad, dbias, *, xp):
    """The batched weight gradient, and the input gradient by output phases (``halving_input_grad``)."""
    N, O, Ho, Wo = dy.shape
    dweight = weight_grad(xp.reshape(dy, (N, O, Ho * Wo)), cache.cols, cache.weight.shape, xp=xp)
    if not input_grad:
        return None, dweight, dbias
    H, W = cache.x_shape[2:]
    return halving_input_grad(dy, cache.weight, H, W, xp=xp), dweight, dbias




def flat_padded(x, padding, *, xp):
    """``x (N, C, H, W)`` zero-padded and flattened with row width ``Wp = W + p``: ``(N, C, P)``.

    Each row holds its ``W`` values and then ``p`` zeros; as the rows run on into each
    other, the zeros at the end of one row are also the left padding of the next, so
    only ``p`` of every ``Wp`` output positions are junk (docs/KERNELS.md). The array
    starts ``p`` zeros before the ``p`` top padding rows: ``x[r, c]`` is at
    ``p + (r + p) Wp + c``, and the window of kernel offset ``(i, j)`` for the output
    position ``q = y Wp + x`` starts at ``q + i Wp + j``. A spare zero row at the bottom
    keeps every window inside the buffer. ``P = (H + 2p + 1) Wp + p``.
    """
    N, C, H, W = x.shape
    p = padding
    Wp, rows = W + p, H + 2 * p + 2  # a row above, whose last p zeros lead the array, and a spare row below
    buf = xp.empty((N, C, rows, Wp), dtype=x.dtype, device=device(x))

    def fill(s, e):  # every element written once: the zeros around the image, then the image
        block = buf[s:e, ...]
        block[:, :, : p + 1, :] = 0
        block[:, :, p + 1 + H :, :] = 0
        block[:, :, p + 1 : p + 1 + H, W:] = 0
        block[:, :, p + 1 : p + 1 + H, :W] = x[s:e, ...]

    _in_blocks(fill, *_thread_blocks(N, C * rows * Wp * (xp.finfo(x.dtype).bits // 8), xp=xp), xp=xp)
    return xp.reshape(buf, (N, C, rows * Wp))[:, :, Wp - p :]


def _flat_im2col(flat, k, Wp, L, *, xp):
    """``(N, C, P)`` flattened padded images -> ``(N, C k k, L)``: offset (i, j) starts at ``i Wp + j``."""
    N, C, _ = flat.shape
    cols = xp.stack([flat[:, :, i * Wp + j : i * Wp + j + L] for i in range(k) for j in range(k)], axis=2)
    return xp.reshape(cols, (N, C * k * k, L))


def _blocks(N, image_bytes, *, xp):
    """``(start, stop)`` of the image blocks of "flat": about FLAT_BLOCK_BYTES of temporaries each.

    The blocks are for the CPU's caches; on CuPy the whole batch is one block (small
    blocks would only mean more, smaller kernel launches).
    """
    if is_cupy_namespace(xp):
        return [(0, N)]
    b = max(1, min(N, FLAT_BLOCK_BYTES // max(image_bytes, 1)))
    return [(s, min(s + b, N)) for s in range(0, N, b)]


def _thread_blocks(N, image_bytes, *, xp):
    """``(blocks, threads)``: ``_blocks``, and the host threads they run on (``backend.conv_threads``);
    with more than one thread, at least as many blocks as threads where the batch allows."""
    blocks = _blocks(N, image_bytes, xp=xp)
    threads = conv_thread_count() if is_numpy_namespace(xp) else 1
    if threads > 1 and len(blocks) < threads and N > 1:
        b = -(-N // threads)
        blocks = [(s, min(s + b, N)) for s in range(0, N, b)]
    return blocks, threads


def _in_blocks(job, blocks, threads, *, xp):
    """``[job(s, e) for (s, e) in blocks]``, on ``threads`` host threads when more than one."""
    return run_independent([lambda s=s, e=e: job(s, e) for s, e in blocks], xp, threads)


def _summed(parts):
    """The parts added left to right (the order of the one-thread loop)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def flat_product_first(C, O):
    """Whether a "flat" convolution of ``C`` to ``O`` channels multiplies first (``_flat_conv``)."""
    return C >= 2 * O


def _flat_conv(flat, weight, bias, Ho, Wo, Wp, *, xp):
    """The "same" convolution of flattened padded images ``flat (N, C, P)``, cropped: ``(N, O, Ho, Wo)``.

    With at least twice as many input as output channels, the product comes first: one
    ``(k k O, C) @ (C, P)`` product per image, then the nine offsets' shifted runs of it
    summed (copies of ``O`` rows instead of an im2col of ``C k k`` rows); otherwise the
    im2col of docs/KERNELS.md and one product.
    """
    N, C, P = flat.shape
    O, _, k, _ = weight.shape
    L = Ho * Wp
    itemsize = xp.finfo(flat.dtype).bits // 8
    product_first = flat_product_first(C, O)
    if product_first:
        wk = xp.reshape(xp.permute_dims(weight, (2, 3, 0, 1)), (k * k * O, C))  # row (i k + j) O + o
        image_bytes = k * k * O * P * itemsize
    else:
        w2 = xp.reshape(weight, (O, C * k * k))
        image_bytes = C * k * k * L * itemsize
    blocks, threads = _thread_blocks(N, image_bytes, xp=xp)

    def product(s, e):  # (e - s, O, Ho Wp)
        if product_first:
            z = xp.reshape(xp.matmul(wk, flat[s:e, ...]), (e - s, k * k, O, P))
            prod = z[:, 0, :, :L] + z[:, 1, :, 1 : 1 + L]
            for i in range(k):
                for j in range(k):
                    if i * k + j > 1:
                        prod += z[:, i * k + j, :, i * Wp + j : i * Wp + j + L]
            return prod
        return xp.matmul(w2, _flat_im2col(flat[s:e, ...], k, Wp, L, xp=xp))

    if len(blocks) == 1:
        return _flat_unpad(product(0, N), Ho, Wo, Wp, bias, xp=xp)
    y = xp.empty((N, O, Ho, Wo), dtype=flat.dtype, device=device(flat))
    _in_blocks(lambda s, e: _flat_unpad_into(y, s, e, product(s, e), Wp, bias, xp=xp), blocks, threads, xp=xp)
    return y


def _flat_unpad(y, Ho, Wo, Wp, bias, *, xp):
    """``(N, O, Ho Wp)`` on the padded-width grid -> contiguous ``(N, O, Ho, Wo)`` (+ bias, in the same pass)."""
    N, O, _ = y.shape
    y = xp.reshape(y, (N, O, Ho, Wp))[..., :Wo]
    if bias is not None:
        return y + xp.reshape(bias, (O, 1, 1))
    return contiguous(y, xp=xp)


def _flat_unpad_into(out, s, e, prod, Wp, bias, *, xp):
    """One block's ``prod (e - s, O, Ho Wp)`` (a fresh array) cropped into ``out[s:e]`` (+ bias).

    Writing each block into the preallocated output saves the copy of a final concatenation.
    """
    _, O, Ho, Wo = out.shape
    if bias is not None:
        prod += xp.reshape(bias, (O, 1))
    out[s:e, ...] = xp.reshape(prod, (e - s, O, Ho, Wp))[..., :Wo]


def flat_backward(dy, cache: FlatCache, input_grad, dbias, *, xp):
    """``conv2d_backward`` of the "flat" layout (docs/KERNELS.md).

    ``dy`` is padded and flattened like ``x``. Its im2col ``dcols`` (``O k k`` rows) gives
    the input gradient, the "same" convolution of ``dy`` with the flipped kernel, and the
    weight gradient, ``dcols`` times ``x`` on the padded-width grid with the kernel offsets
    flipped; only when ``dx`` is not wanted and ``x`` has fewer channels than ``dy`` is the
    weight gradient taken from the im2col of ``x`` instead.
    """
    N, O, Ho, Wo = dy.shape
    _, C, k, _ = cache.weight.shape
    H, W = cache.x_shape[2:]
    Wp, L, q = flat_grid(cache)
    itemsize = xp.finfo(dy.dtype).bits // 8
    dyflat = flat_padded(dy, cache.padding, xp=xp)
    if not input_grad and C < O:
        dyg = dyflat[:, :, q : q + L]  # dy on the padded-width grid, zero in the junk columns
        blocks, threads = _thread_blocks(N, C * k * k * L * itemsize, xp=xp)
        parts = _in_blocks(lambda s, e: weight_grad(dyg[s:e, ...], _flat_im2col(cache.padded[s:e, ...], k, Wp, L, xp=xp),
                                                    cache.weight.shape, xp=xp), blocks, threads, xp=xp)
        return None, _summed(parts), dbias
    xg = cache.padded[:, :, q : q + L]  # x on the padded-width grid
    wt = flipped_taps(cache.weight, xp=xp)
    blocks, threads = _thread_blocks(N, O * k * k * L * itemsize, xp=xp)
    if len(blocks) == 1:
        dcols = _flat_im2col(dyflat, k, Wp, L, xp=xp)  # (N, O k k, L)
        g = xp.sum(xp.matmul(dcols, xp.matrix_transpose(xg)), axis=0)  # (O k k, C)
        dx = _flat_unpad(xp.matmul(wt, dcols), H, W, Wp, None, xp=xp) if input_grad else None
        return dx, unflipped_weight_grad(g, cache.weight.shape, xp=xp), dbias
    dx = xp.empty(cache.x_shape, dtype=dy.dtype, device=device(dy)) if input_grad else None

    def block(s, e):  # this block's share of the weight gradient; its rows of dx
        dcols = _flat_im2col(dyflat[s:e, ...], k, Wp, L, xp=xp)  # (e - s, O k k, L)
        part = xp.sum(xp.matmul(dcols, xp.matrix_transpose(xg[s:e, ...])), axis=0)  # (O k k, C)
        if input_grad:
            _flat_unpad_into(dx, s, e, xp.matmul(wt, dcols), Wp, None, xp=xp)
        return part

    g = _summed(_in_blocks(block, blocks, threads, xp=xp))
    return dx, unflipped_weight_grad(g, cache.weight.shape, xp=xp), dbias


def flat_grid(cache: FlatCache):
    """``(Wp, L, q)`` of a stride-1 "flat" convolution: the padded row width, the length of the
    output on the padded-width grid (``Ho Wp``), and where ``x[0, 0]`` sits in the flattened
    padded image (``p Wp + p``)."""
    H, W = cache.x_shape[2:]
    p = cache.padding
    Wp = W + p
    return Wp, H * Wp, p * Wp + p


def flipped_taps(weight, *, xp):
    """``(C, O k k)``: the kernel flipped in both spatial axes, input channels as rows; times the
    im2col of ``dy`` it gives the input gradient of a "same" convolution (docs/KERNELS.md)."""
    O, C, k, _ = weight.shape
    return xp.reshape(xp.permute_dims(xp.flip(weight, axis=(2, 3)), (1, 0, 2, 3)), (C, O * k * k))


def unflipped_weight_grad(g, shape, *, xp):
    """``g (O k k, C)``, the product of the im2col of ``dy`` with ``x``, as the weight gradient
    ``(O, C, k, k)``: row ``o k k + (i' k + j')`` belongs to the flipped offset
    ``(i', j') = (k-1-i, k-1-j)``."""
    O, C, k, _ = shape
    return contiguous(xp.permute_dims(xp.flip(xp.reshape(g, (O, k, k, C)), axis=(1, 2)), (0, 3, 1, 2)), xp=xp)


def halving_input_grad(dy, weight, H, W, *, xp):
    """``dx`` of a 3x3, stride-2, padding-1 convolution, one output phase at a time (docs/KERNELS.md).

    ``dx[c, 2t + a, 2s + b]`` only receives the kernel taps of one parity: phase (0, 0) the
    centre tap, (1, 0) and (0, 1) two taps, (1, 1) the four corners, each tap reading ``dy``
    shifted by 0 or 1 row and column. ``dy`` zero-padded by one row and column after its
    end and flattened (row width ``Wo + 1``) makes every shift a contiguous run; the four
    shifts stacked in the order (0, 1), (0, 0), (1, 0), (1, 1) give each phase its taps as
    one contiguous block of rows, so each phase is one product, with no col2im scatter.
    """
    N, O, Ho, Wo = dy.shape
    C = weight.shape[1]
    Wq = Wo + 1
    L = Ho * Wq
    buf = xp.zeros((N, O, Ho + 2, Wq), dtype=dy.dtype, device=device(dy))  # + a spare row
    buf[:, :, :Ho, :Wo] = dy
    g = xp.reshape(buf, (N, O, (Ho + 2) * Wq))

    def taps(*ij):  # (C, O * len(ij)): the transposed taps side by side
        return xp.concat([xp.matrix_transpose(weight[:, :, i, j]) for i, j in ij], axis=1)

    # phase (a, b): its weights and the first row block of dcols it reads (blocks of O rows)
    phases = [
        ((0, 0), taps((1, 1)), 1),
        ((1, 0), taps((2, 1), (0, 1)), 1),
        ((0, 1), taps((1, 0), (1, 2)), 0),
        ((1, 1), taps((2, 0), (2, 2), (0, 2), (0, 0)), 0),
    ]
    dx = xp.empty((N, C, H, W), dtype=dy.dtype, device=device(dy))

    def block(s, e):
        dcols = xp.concat([g[s:e, :, sy * Wq + sx : sy * Wq + sx + L] for sy, sx in ((0, 1), (0, 0), (1, 0), (1, 1))], axis=1)
        for (a, b), wm, first in phases:
            part = xp.matmul(wm, dcols[:, first * O : first * O + wm.shape[1], :])  # (e - s, C, L)
            dx[s:e, :, a::2, b::2] = xp.reshape(part, (e - s, C, Ho, Wq))[..., :Wo]

    blocks, threads = _thread_blocks(N, 4 * O * L * (xp.finfo(dy.dtype).bits // 8), xp=xp)
    _in_blocks(block, blocks, threads, xp=xp)
    return dx


# the dispatch of functional.conv2d_forward / conv2d_backward by algorithm name
FORWARD = {"merged": merged_forward, "flat": flat_forward, "phases": phases_forward}
BACKWARD = {"merged": merged_backward, "flat": flat_backward, "phases": phases_backward}
