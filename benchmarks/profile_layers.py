"""Where a TinySiamCD training step spends its time: each layer kind at the benchmark shapes.

    python benchmarks/profile_layers.py --backend numpy --batch 8 --size 64
    python benchmarks/profile_layers.py --backend cupy --batch 16 --size 256 --torch

Times (median ms, device-synchronised) the conv layers' parts in the batched
layout (im2col, the forward matmul, the weight and input-gradient matmuls,
col2im), each whole conv forward and backward in the batched, merged and flat
layouts (``hicd_core.functional.CONV_LAYOUTS``), a candidate flat backward with the
batch folded into the pixel axis (``flat_backward_one_product``), BatchNorm and ReLU
forward + backward and the passes of BatchNorm's forward one by one (``bn_parts``),
for every conv shape of the network, and prints one JSON line per layer plus totals.
``--torch`` adds the same conv's forward + backward and BatchNorm + ReLU's forward +
backward through torch (cuDNN / oneDNN) for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core import backend  # noqa: E402
from hicd_core import conv_layouts as CL  # noqa: E402
from hicd_core import functional as F  # noqa: E402
from hicd_core.model import DEFAULT_WIDTHS, TinySiamCD  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import device_sync, median_ms, torch_sync  # noqa: E402


def timer(xp):
    """``t(fn)``: the median milliseconds of 10 synchronised calls, rounded."""
    sync = device_sync(xp)
    return lambda fn, repeats=10: round(median_ms(fn, sync, repeats, warmup=1)[0], 3)


def dw_split_k(dy2, cols, xp, chunk=4096):
    """sum_n dy_n cols_n^T with the pixel axis cut into chunks: more, smaller independent products."""
    N, O, L = dy2.shape
    K = cols.shape[1]
    S = max(L // chunk, 1)
    if L % S:
        S = 1
    a = xp.reshape(xp.permute_dims(xp.reshape(dy2, (N, O, S, L // S)), (0, 2, 1, 3)), (N * S, O, L // S))
    b = xp.reshape(xp.permute_dims(xp.reshape(cols, (N, K, S, L // S)), (0, 2, 3, 1)), (N * S, L // S, K))
    return xp.sum(xp.matmul(a, b), axis=0)


def bn_parts(t, y, xp):
    """The passes of a training BatchNorm forward over ``y (N, C, H, W)``, each timed alone.

    ``channel_sum``: one per-channel sum (a matrix-vector product, as ``batchnorm2d``
    takes it), beside ``channel_sum_reduce`` (the library reduction over axes 0, 2, 3);
    ``centre``: ``y - mean``; ``square_sum``: the variance's sum of squares as
    ``batchnorm2d`` takes it (square, then sum) beside ``square_sum_dot`` (one dot
    product per image and channel, no squared copy); ``scale_shift``: ``centred s + t``.
    """
    N, C, H, W = y.shape
    mean = xp.reshape(F.channel_sum(y, xp=xp) * (1.0 / (N * H * W)), (1, C, 1, 1))
    centred = y - mean
    rows = xp.reshape(centred, (N * C, 1, H * W))
    return {
        "bn_channel_sum": t(lambda: F.channel_sum(y, xp=xp)),
        "bn_channel_sum_reduce": t(lambda: xp.sum(y, axis=(0, 2, 3))),
        "bn_centre": t(lambda: y - mean),
        "bn_square_sum": t(lambda: F.channel_sum(centred * centred, xp=xp)),
        "bn_square_sum_dot": t(lambda: xp.sum(xp.reshape(xp.matmul(rows, xp.matrix_transpose(rows)), (N, C)), axis=0)),
        "bn_scale_shift": t(lambda: centred * mean + mean),
    }


def _contiguous(a, xp):
    """A C-ordered copy (a reshape to 1-d must copy, then a free reshape back)."""
    return xp.reshape(xp.reshape(a, (-1,)), a.shape)


def flat_backward_one_product(dy, cache, xp, input_grad=True):
    """A candidate "flat" backward for GPUs: the batch folded into the pixel axis (stride 1 only).

    ``dy`` is padded and flattened with the channel axis first, ``(O, N, P)``, so that
    its im2col is one ``(O k k, N L)`` matrix and the weight gradient is one product with
    ``x`` on the padded-width grid ``(C, N L)`` (a transposed copy of ``x``) instead of a
    batched product summed over the images, the form that ran with little parallelism on
    the H200; the input gradient is one product too, cropped and transposed back in one
    copy. Returns ``(dx or None, dweight)``; ``main`` reports their largest difference from
    ``conv2d_backward``'s, relative to its largest value (``flat_one_product_err``).
    """
    N, C, H, W = cache.x_shape
    k = cache.weight.shape[2]
    Wp, L, q = CL.flat_grid(cache)
    dyflat = CL.flat_padded(xp.permute_dims(dy, (1, 0, 2, 3)), cache.padding, xp=xp)  # (O, N, P)
    dcols = xp.stack([dyflat[:, :, i * Wp + j : i * Wp + j + L] for i in range(k) for j in range(k)], axis=1)
    dcols = xp.reshape(dcols, (-1, N * L))  # (O k k, N L)
    xg = _contiguous(xp.permute_dims(cache.padded[:, :, q : q + L], (1, 0, 2)), xp=xp)  # (C, N, L)
    g = xp.matmul(dcols, xp.matrix_transpose(xp.reshape(xg, (C, N * L))))  # (O k k, C)
    dweight = CL.unflipped_weight_grad(g, cache.weight.shape, xp=xp)
    if not input_grad:
        return None, dweight
    dxt = xp.reshape(xp.matmul(CL.flipped_taps(cache.weight, xp=xp), dcols), (C, N, H, Wp))[..., :W]
    return _contiguous(xp.permute_dims(dxt, (1, 0, 2, 3)), xp=xp), dweight


def layer_shapes(batch, size, widths=DEFAULT_WIDTHS):
    """(name, N, C_in, H, W, C_out, stride) of every 3x3 conv in the network."""
    model = TinySiamCD(widths)
    out, side = [], size
    for name, (cin, cout, stride) in model.layers.items():
        n = 2 * batch if name.startswith("enc") else batch
        if name.startswith("dec"):
            side_in = size // 2 ** (int(name[3]) - 1)
        else:
            side_in = side
            side = side // stride
        out.append((name, n, cin, side_in, side_in, cout, stride))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--torch", action="store_true")
    args = parser.parse_args(argv)
    backend.keep_host_memory()
    xp = backend.namespace(args.backend)
    # the parts below are those of the batched layout; whole layers for all three
    t = timer(xp)
    rng = np.random.default_rng(0)
    totals = {}
    torch = None
    if args.torch:
        import torch

        dev = "cuda" if args.backend == "cupy" else "cpu"
    for name, n, cin, h, w, cout, stride in layer_shapes(args.batch, args.size):
        x = backend.from_host(rng.standard_normal((n, cin, h, w), dtype=np.float32), xp)
        wt = backend.from_host(rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * 0.1, xp)
        b = backend.from_host(np.zeros(cout, np.float32), xp)
        y, cache = F.conv2d_forward(x, wt, b, stride=stride, padding=1, layout="batched")
        dy = backend.from_host(rng.standard_normal(tuple(y.shape), dtype=np.float32), xp)
        Ho, Wo = y.shape[2], y.shape[3]
        cols = cache.cols
        w2 = xp.reshape(wt, (cout, cin * 9))
        dy2 = xp.reshape(dy, (n, cout, Ho * Wo))
        dcols = xp.matmul(xp.matrix_transpose(w2), dy2)
        row = {
            "layer": name, "shape": [n, cin, h, w, cout, stride],
            "im2col": t(lambda: F.im2col(x, 3, 3, stride, 1, Ho, Wo, xp=xp)),
            "fwd_matmul": t(lambda: xp.matmul(w2, cols)),
            "dW_matmul": t(lambda: xp.sum(xp.matmul(dy2, xp.matrix_transpose(cols)), axis=0)),
            "dW_tensordot": t(lambda: xp.tensordot(dy2, cols, axes=([0, 2], [0, 2]))),
            "dW_splitk": t(lambda: dw_split_k(dy2, cols, xp)),
            "dcols_matmul": t(lambda: xp.matmul(xp.matrix_transpose(w2), dy2)),
            "col2im": t(lambda: F.col2im(dcols, (n, cin), h, w, 3, 3, stride, 1, Ho, Wo, xp=xp)),
            "conv_fwd": t(lambda: F.conv2d_forward(x, wt, b, stride=stride, padding=1, layout="batched")),
            "conv_bwd": t(lambda: F.conv2d_backward(dy, cache)),
        }
        need_dx = name != "enc1.0"  # the model skips the first convolution's input gradient
        for layout in ("merged", "flat"):
            _, other_cache = F.conv2d_forward(x, wt, b, stride=stride, padding=1, layout=layout)
            row[f"conv_fwd_{layout}"] = t(lambda: F.conv2d_forward(x, wt, b, stride=stride, padding=1, layout=layout))
            row[f"conv_bwd_{layout}"] = t(lambda: F.conv2d_backward(dy, other_cache, input_grad=need_dx))
            if layout == "flat":
                form = "stride 2, dx by phases" if stride == 2 else "product first" if CL.flat_product_first(cin, cout) else "im2col"
                row["flat_form"] = f"flat, {form}" if other_cache.layout in ("flat", "phases") else other_cache.layout
                if stride == 1 and other_cache.layout == "flat":
                    dx, dw, _ = F.conv2d_backward(dy, other_cache, input_grad=need_dx)
                    dx1, dw1 = flat_backward_one_product(dy, other_cache, xp, input_grad=need_dx)
                    pairs = ((dx, dx1), (dw, dw1)) if need_dx else ((dw, dw1),)
                    # reported, not asserted: a wrong candidate must not cost a GPU session its profile
                    row["flat_one_product_err"] = max(
                        float(xp.max(xp.abs(a - b1))) / float(xp.max(xp.abs(a))) for a, b1 in pairs)
                    row["conv_bwd_flat_one_product"] = t(
                        lambda: flat_backward_one_product(dy, other_cache, xp, need_dx))
        if backend.is_cupy_namespace(xp):
            import cupy

            def im2col_strided():
                xpad = cupy.zeros((n, cin, h + 2, w + 2), dtype=x.dtype)
                xpad[:, :, 1:-1, 1:-1] = x
                sN, sC, sH, sW = xpad.strides
                view = cupy.lib.stride_tricks.as_strided(
                    xpad, shape=(n, cin, 3, 3, Ho, Wo), strides=(sN, sC, sH, sW, sH * stride, sW * stride))
                return cupy.ascontiguousarray(view).reshape(n, cin * 9, Ho * Wo)

            assert bool(cupy.all(im2col_strided() == cols))
            row["im2col_strided"] = t(im2col_strided)
        g = backend.from_host(np.ones(cout, np.float32), xp)
        z = backend.from_host(np.zeros(cout, np.float32), xp)
        _, bn_cache, _, _ = F.batchnorm2d_forward(y, g, z, z, g, training=True)
        row["bn_fwd"] = t(lambda: F.batchnorm2d_forward(y, g, z, z, g, training=True))
        row["bn_bwd"] = t(lambda: F.batchnorm2d_backward(dy, bn_cache))
        row.update(bn_parts(t, y, xp))
        _, relu_cache = F.relu_forward(y)
        row["relu_fwd_bwd"] = t(lambda: F.relu_backward(dy, F.relu_forward(y)[1]))
        if torch is not None:
            tx = torch.as_tensor(backend.to_host(x), device=dev).requires_grad_(True)
            tw = torch.as_tensor(backend.to_host(wt), device=dev).requires_grad_(True)
            tdy = torch.as_tensor(backend.to_host(dy), device=dev)

            def torch_conv():
                out = torch.nn.functional.conv2d(tx, tw, None, stride=stride, padding=1)
                out.backward(tdy)

            row["torch_conv_fwd_bwd"] = round(median_ms(torch_conv, torch_sync(torch, dev), 10, warmup=1)[0], 3)
            bn = torch.nn.BatchNorm2d(cout).to(dev)
            ty = torch.as_tensor(backend.to_host(y), device=dev).requires_grad_(True)

            def torch_bn_relu():
                torch.relu(bn(ty)).backward(tdy)

            row["torch_bn_relu_fwd_bwd"] = round(median_ms(torch_bn_relu, torch_sync(torch, dev), 10, warmup=1)[0], 3)
        for k, v in row.items():
            if isinstance(v, float) and not k.endswith("_err"):
                totals[k] = round(totals.get(k, 0.0) + v, 3)
        print(json.dumps(row))
    print(json.dumps({"totals": totals, "backend": args.backend, "batch": args.batch, "size": args.size}))


if __name__ == "__main__":
    main()
