"""Plain float64 NumPy transcription of SPEC section 2, written straight from the equations.

Explicit loops over windows, positions and rows, so that each line can be
checked against the formula it transcribes. Gradients are derived here
independently, element by element (the chain rule written per pixel with the
full C x C Jacobian of the normalisation), not by the matrix identities that
``hicd_core`` uses. This module never imports ``hicd_core``.
"""

from __future__ import annotations

import numpy as np


def window_positions(H, W, window):
    """List over windows k of the list over positions i of the pixel (y, x) = p_ki."""
    if window is None:
        return [[(y, x) for y in range(H) for x in range(W)]]
    w = window
    assert H % w == 0 and W % w == 0
    blocks_x = W // w
    out = []
    for k in range((H // w) * blocks_x):
        row = []
        for i in range(w * w):
            y = (k // blocks_x) * w + i // w
            x = (k % blocks_x) * w + i % w
            row.append((y, x))
        out.append(row)
    return out


def normalize_vector(v, eps):
    return v / np.sqrt(np.sum(v * v) + eps)


def normalize_jacobian(v, eps):
    """d(v / sqrt(|v|^2 + eps)) / dv as a full C x C matrix: r I - r^3 v v^T."""
    r = 1.0 / np.sqrt(np.sum(v * v) + eps)
    return r * np.eye(v.size) - r**3 * np.outer(v, v)


def normalize_pixels(f, eps=1e-6):
    f = np.asarray(f, dtype=np.float64)
    N, C, H, W = f.shape
    out = np.empty_like(f)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                out[n, :, y, x] = normalize_vector(f[n, :, y, x], eps)
    return out


def self_correlation(f, window=None, eps=1e-6):
    return cross_correlation(f, f, window, eps)


def cross_correlation(f1, f2, window=None, eps=1e-6):
    h1, h2 = normalize_pixels(f1, eps), normalize_pixels(f2, eps)
    N, C, H, W = h1.shape
    pos = window_positions(H, W, window)
    K, M = len(pos), len(pos[0])
    R = np.zeros((N, K, M, M))
    for n in range(N):
        for k in range(K):
            for i, (yi, xi) in enumerate(pos[k]):
                for j, (yj, xj) in enumerate(pos[k]):
                    R[n, k, i, j] = np.dot(h1[n, :, yi, xi], h2[n, :, yj, xj])
    return R


def pooled(f):
    f = np.asarray(f, dtype=np.float64)
    B, C, H, W = f.shape
    g = np.zeros((B, C))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                g[b] += f[b, :, y, x]
    return g / (H * W)


def global_correlation(f, eps=1e-6):
    g = pooled(f)
    B = g.shape[0]
    gh = [normalize_vector(g[b], eps) for b in range(B)]
    R = np.zeros((B, B))
    for a in range(B):
        for b in range(B):
            R[a, b] = np.dot(gh[a], gh[b])
    return R


def _softmax_row(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def distance(r_s, r_t, kind="kl", tau=0.5):
    r_s = np.asarray(r_s, dtype=np.float64)
    r_t = np.asarray(r_t, dtype=np.float64)
    if kind == "mse":
        return float(np.mean((r_s - r_t) ** 2))
    M = r_s.shape[-1]
    rows_s, rows_t = r_s.reshape(-1, M), r_t.reshape(-1, M)
    P = rows_s.shape[0]
    total = 0.0
    for row_s, row_t in zip(rows_s, rows_t):
        p, q = _softmax_row(row_t / tau), _softmax_row(row_s / tau)
        for j in range(M):
            total += p[j] * (np.log(p[j]) - np.log(q[j]))
    return tau**2 / P * total


def distance_grad(r_s, r_t, kind="kl", tau=0.5):
    """dD/dr_s element by element: tau/P (q - p) for kl, 2 (r_s - r_t)/size for mse."""
    r_s = np.asarray(r_s, dtype=np.float64)
    r_t = np.asarray(r_t, dtype=np.float64)
    if kind == "mse":
        return 2.0 * (r_s - r_t) / r_s.size
    M = r_s.shape[-1]
    rows_s, rows_t = r_s.reshape(-1, M), r_t.reshape(-1, M)
    P = rows_s.shape[0]
    out = np.zeros_like(rows_s)
    for r in range(P):
        p, q = _softmax_row(rows_t[r] / tau), _softmax_row(rows_s[r] / tau)
        for j in range(M):
            out[r, j] = tau / P * (q[j] - p[j])
    return out.reshape(r_s.shape)


def _pixel_chain(f, dfhat, eps):
    """df[n, :, y, x] = J(f[n, :, y, x])^T dfhat[n, :, y, x], pixel by pixel."""
    N, C, H, W = f.shape
    df = np.zeros_like(dfhat)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                J = normalize_jacobian(f[n, :, y, x], eps)
                df[n, :, y, x] = J.T @ dfhat[n, :, y, x]
    return df


def cross_correlation_grad(dR, f1, f2, window=None, eps=1e-6):
    """(df1, df2) for a given upstream gradient dR of CC(f1, f2, window)."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    h1, h2 = normalize_pixels(f1, eps), normalize_pixels(f2, eps)
    N, C, H, W = f1.shape
    pos = window_positions(H, W, window)
    dh1, dh2 = np.zeros_like(h1), np.zeros_like(h2)
    for n in range(N):
        for k, window_pos in enumerate(pos):
            for i, (yi, xi) in enumerate(window_pos):
                for j, (yj, xj) in enumerate(window_pos):
                    dh1[n, :, yi, xi] += dR[n, k, i, j] * h2[n, :, yj, xj]
                    dh2[n, :, yj, xj] += dR[n, k, i, j] * h1[n, :, yi, xi]
    return _pixel_chain(f1, dh1, eps), _pixel_chain(f2, dh2, eps)


def self_correlation_grad(dR, f, window=None, eps=1e-6):
    """df for an upstream gradient dR of SC(f, window): both slots of CC(f, f) receive f."""
    d1, d2 = cross_correlation_grad(dR, f, f, window, eps)
    return d1 + d2


def global_correlation_grad(dR, f, eps=1e-6):
    f = np.asarray(f, dtype=np.float64)
    B, C, H, W = f.shape
    g = pooled(f)
    gh = [normalize_vector(g[b], eps) for b in range(B)]
    dgh = np.zeros((B, C))
    for a in range(B):
        for b in range(B):
            dgh[a] += dR[a, b] * gh[b]
            dgh[b] += dR[a, b] * gh[a]
    df = np.zeros_like(f)
    for b in range(B):
        dg = normalize_jacobian(g[b], eps).T @ dgh[b]
        for y in range(H):
            for x in range(W):
                df[b, :, y, x] = dg / (H * W)
    return df


def hicd_loss(student_sem, teacher_sem, student_chg=None, teacher_chg=None, *, windows,
              change_window=None, w_self=1.0, w_cross=1.0, w_global=1.0, kind="kl", tau=0.5, eps=1e-6):
    """SPEC section 2's L_hicd and its gradients, term by term.

    Returns ``(loss, grads)`` with ``grads["sem"]`` a list of (g1, g2) and
    ``grads["chg"]`` the change-feature gradient or None.
    """
    D = lambda a, b: distance(a, b, kind, tau)  # noqa: E731
    dD = lambda a, b: distance_grad(a, b, kind, tau)  # noqa: E731
    loss = 0.0
    grads_sem = []
    for (s1, s2), (t1, t2), w in zip(student_sem, teacher_sem, windows):
        s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
        g1, g2 = np.zeros_like(s1), np.zeros_like(s2)
        if w_self:
            for s, t, g in ((s1, t1, g1), (s2, t2, g2)):
                rs, rt = self_correlation(s, w, eps), self_correlation(t, w, eps)
                loss += w_self * D(rs, rt) / 2
                g += self_correlation_grad(w_self / 2 * dD(rs, rt), s, w, eps)
        if w_cross:
            rs, rt = cross_correlation(s1, s2, w, eps), cross_correlation(t1, t2, w, eps)
            loss += w_cross * D(rs, rt)
            d1, d2 = cross_correlation_grad(w_cross * dD(rs, rt), s1, s2, w, eps)
            g1 += d1
            g2 += d2
        if w_global:
            s = np.concatenate([s1, s2], axis=0)
            t = np.concatenate([np.asarray(t1, np.float64), np.asarray(t2, np.float64)], axis=0)
            rs, rt = global_correlation(s, eps), global_correlation(t, eps)
            loss += w_global * D(rs, rt)
            d = global_correlation_grad(w_global * dD(rs, rt), s, eps)
            n = s1.shape[0]
            g1 += d[:n]
            g2 += d[n:]
        grads_sem.append((g1, g2))
    grad_chg = None
    if student_chg is not None:
        c = np.asarray(student_chg, np.float64)
        grad_chg = np.zeros_like(c)
        if w_self:
            rs, rt = self_correlation(c, change_window, eps), self_correlation(teacher_chg, change_window, eps)
            loss += w_self * D(rs, rt)
            grad_chg += self_correlation_grad(w_self * dD(rs, rt), c, change_window, eps)
        if w_global:
            rs, rt = global_correlation(c, eps), global_correlation(teacher_chg, eps)
            loss += w_global * D(rs, rt)
            grad_chg += global_correlation_grad(w_global * dD(rs, rt), c, eps)
    return loss, {"sem": grads_sem, "chg": grad_chg}
