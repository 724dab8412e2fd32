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
