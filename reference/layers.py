"""Naive float64 loop implementations of conv2d and batchnorm2d, forward and backward.

Written from the definitions with explicit loops over output positions, for
parity tests of ``hicd_core.functional``. Never imports ``hicd_core``.
"""

from __future__ import annotations

import numpy as np


def zero_pad(x, padding):
    """Copy of x (N, C, H, W) with ``padding`` zeros around H and W."""
    N, C, H, W = x.shape
    out = np.zeros((N, C, H + 2 * padding, W + 2 * padding))
    out[:, :, padding:padding + H, padding:padding + W] = x
    return out


def conv2d(x, w, b=None, stride=1, padding=0):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = zero_pad(x, padding)
    Ho = (H + 2 * padding - kh) // stride + 1
    Wo = (W + 2 * padding - kw) // stride + 1
    y = np.zeros((N, O, Ho, Wo))
    for n in range(N):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    patch = xp[n, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    y[n, o, i, j] = np.sum(patch * w[o]) + (0.0 if b is None else b[o])
    return y


def conv2d_grad(dy, x, w, stride=1, padding=0):
    """(dx, dw, db) by the chain rule applied to each output element's patch."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp = zero_pad(x, padding)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    db = np.zeros(O)
    _, _, Ho, Wo = dy.shape
    for n in range(N):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    g = dy[n, o, i, j]
                    sl = (n, slice(None), slice(i * stride, i * stride + kh), slice(j * stride, j * stride + kw))
                    dw[o] += g * xp[sl]
                    dxp[sl] += g * w[o]
                    db[o] += g
    return dxp[:, :, padding:padding + H, padding:padding + W], dw, db


def batchnorm2d_train(x, gamma, beta, eps=1e-5):
    """Per channel: mean and biased variance over (N, H, W), then scale and shift."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    y = np.zeros_like(x)
    for c in range(C):
        vals = x[:, c].ravel()
        mu = vals.sum() / vals.size
        var = ((vals - mu) ** 2).sum() / vals.size
        y[:, c] = gamma[c] * (x[:, c] - mu) / np.sqrt(var + eps) + beta[c]
    return y


def batchnorm2d_train_grad(dy, x, gamma, eps=1e-5):
    """(dx, dgamma, dbeta) from the full m x m Jacobian of each channel's normalisation."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    dx = np.zeros_like(x)
    dgamma = np.zeros(C)
    dbeta = np.zeros(C)
    for c in range(C):
        v = x[:, c].ravel()
        m = v.size
        mu = v.mean()
        var = ((v - mu) ** 2).mean()
        s = np.sqrt(var + eps)
        xhat = (v - mu) / s
        # d xhat_i / d v_j = (delta_ij - 1/m) / s - xhat_i xhat_j / (m s)
        J = (np.eye(m) - 1.0 / m) / s - np.outer(xhat, xhat) / (m * s)
        g = dy[:, c].ravel()
        dx[:, c] = (J.T @ (g * gamma[c])).reshape(N, H, W)
        dgamma[c] = np.sum(g * xhat)
        dbeta[c] = np.sum(g)
    return dx, dgamma, dbeta


def conv_transpose2d(x, w, b=None, stride=2, padding=1, output_padding=1):
    """Transposed convolution by scattering: every input pixel adds ``x[n, c, i, j] * w[c]`` into the
    output window at ``(stride i - padding, stride j - padding)``; ``w`` is (Cin, Cout, k, k)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    _, O, k, _ = w.shape
    Ho = (H - 1) * stride - 2 * padding + k + output_padding
    Wo = (W - 1) * stride - 2 * padding + k + output_padding
    # scatter into a frame with room for the windows that stick out, then crop
    full = np.zeros((N, O, Ho + 2 * padding + k, Wo + 2 * padding + k))
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    full[n, :, i * stride:i * stride + k, j * stride:j * stride + k] += x[n, c, i, j] * w[c]
    y = full[:, :, padding:padding + Ho, padding:padding + Wo].copy()
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv_transpose2d_grad(dy, x, w, stride=2, padding=1):
    """(dx, dw, db) of ``conv_transpose2d``: each input pixel's gradient gathers ``dy`` over its window."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    _, O, k, _ = w.shape
    _, _, Ho, Wo = dy.shape
    full = np.zeros((N, O, Ho + 2 * padding + k, Wo + 2 * padding + k))
    full[:, :, padding:padding + Ho, padding:padding + Wo] = dy
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    patch = full[n, :, i * stride:i * stride + k, j * stride:j * stride + k]
                    dx[n, c, i, j] = np.sum(patch * w[c])
                    dw[c] += x[n, c, i, j] * patch
    return dx, dw, dy.sum(axis=(0, 2, 3))


def maxpool2x2(x):
    """2 x 2 max pooling, stride 2, by a loop over the windows."""
    x = np.asarray(x, np.float64)
    N, C, H, W = x.shape
    y = np.zeros((N, C, H // 2, W // 2))
    for n in range(N):
        for c in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    y[n, c, i, j] = x[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max()
    return y


def maxpool2x2_grad(dy, x):
    """dx of ``maxpool2x2``: each window's gradient to its first maximum in row-major order."""
    x = np.asarray(x, np.float64)
    dx = np.zeros_like(x)
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            for i in range(H // 2):
                for j in range(W // 2):
                    window = x[n, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                    a, b = divmod(int(np.argmax(window)), 2)  # argmax returns the first maximum
                    dx[n, c, 2 * i + a, 2 * j + b] = dy[n, c, i, j]
    return dx


def dropout2d(x, keep, p):
    """Channel dropout with the 0/1 ``keep`` array (N, C): kept channels scaled by 1 / (1 - p)."""
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    N, C = keep.shape
    for n in range(N):
        for c in range(C):
            if keep[n, c]:
                y[n, c] = x[n, c] / (1.0 - p)
    return y
