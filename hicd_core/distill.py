"""Correlation distillation losses: ``correlation_distance`` and ``hicd_loss``.

HiCD, Pang et al., "Hierarchical correlation distillation for change detection
with different image quality", IEEE TGRS 2024 (arXiv 2401.10752), Sec. III-B/C:
the student reproduces the frozen teacher's self-, cross- and global
correlations of semantic (encoder) and change (decoder) features. Normative
definitions, normalisations and reductions: SPEC section 2; derivations of every
gradient: ``docs/MATH.md``.

Every loss returns ``(loss, gradient)``: the loss is a 0-d array of the inputs'
namespace (no host sync), the gradient is with respect to the student only (the
teacher is a constant).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence

from .backend import (
    all_finite,
    array_namespace,
    as_arrays,
    device,
    is_numpy_namespace,
    is_tracing,
    mutable_namespace,
    run_independent,
)
from .correlation import (
    _row_sum,
    check_feature,
    check_pair,
    check_window,
    global_vectors,
    global_vectors_backward,
    gram,
    gram_backward,
    window_features,
    window_features_backward,
)
from .errors import NonFiniteError

__all__ = ["correlation_distance", "hicd_loss", "feature_mse_loss", "KINDS"]

KINDS = ("kl", "mse")

# correlation entries per block of windows in ``hicd_loss`` on NumPy: 512 KiB of float32,
# half a core's L2 cache on current x86 servers (docs/PERFORMANCE.md)
BLOCK_ELEMENTS = 1 << 17


def _softmax_parts(r, inv_tau, shift=True, *, xp):
    """Row-wise softmax of ``r * inv_tau`` along the last axis, computed stably.

    Returns ``(z, prob, log_sum)`` with ``z = r * inv_tau - c`` and
    ``log softmax = z - log_sum``; every array here is freshly allocated. ``c`` is each
    row's maximum, or 0 with ``shift=False`` (only where ``exp`` can neither overflow nor
    underflow without it, ``_shift_needed``), which saves NumPy's slow reduction over
    short rows and a pass. The updates are in place only on NumPy / CuPy
    (``backend.mutable_namespace``), where nothing else can hold these arrays.
    """
    inplace = mutable_namespace(xp)
    z = r * inv_tau
    if shift:
        row_max = xp.max(z, axis=-1, keepdims=True)
        if inplace:
            z -= row_max
        else:
            z = z - row_max
    prob = xp.exp(z)
    total = _row_sum(prob, xp=xp)
    if inplace:
        prob *= 1.0 / total
    else:
        prob = prob * (1.0 / total)
    return z, prob, xp.log(total)


def _zero_d(value, xp):
    """A reduction's result as a 0-d array: NumPy reductions return scalars, which the API
    does not promise; other namespaces already return 0-d arrays (and torch would warn
    about re-wrapping a tensor that requires grad)."""
    return xp.asarray(value) if mutable_namespace(xp) else value


def _shift_needed(bound, tau, dtype, row_length, *, xp):
    """Whether the softmax of correlations with ``|r| <= bound`` needs its row-maximum shift.

    The values ``z = r / tau`` lie in ``[-b, b]``, ``b = bound / tau``. Without a shift,
    ``exp(z)`` cannot underflow to a subnormal while ``exp(-b)`` is a normal number, and no
    row sum (at most ``row_length exp(b)``) overflows while that stays finite, each with a
    margin of ``e^8``; for float32 this holds up to ``b`` of about 79 (``tau >= 0.013`` for
    ``bound = 1``). An unknown bound (None) always needs the shift.
    """
    if bound is None:
        return True
    info = xp.finfo(dtype)
    b = bound / tau
    return not (b <= -math.log(info.smallest_normal) - 8.0 and b + math.log(max(row_length, 1)) <= math.log(info.max) - 8.0)


def correlation_distance(r_s, r_t, kind="kl", tau=0.5, *, bound=None, rows=None):
    """Distance between a student and a teacher correlation, and its gradient.

    Parameters
    ----------
    r_s, r_t : arrays (..., M) of the same shape
        Student and teacher correlations; ``P = prod(shape[:-1])`` rows.
    kind : {"kl", "mse"}
    tau : float
        Softmax temperature (``kind="kl"`` only), > 0.
    bound : float, optional
        A bound the caller knows on ``|r_s|`` and ``|r_t|`` (1 for correlations of
        L2-normalised features, as in ``hicd_loss``). With it, the softmax skips its
        row-maximum shift where ``exp`` can neither overflow nor underflow without it
        (one reduction and one pass fewer; the same values up to rounding). None: always
        shift, as SPEC 2 says.
    rows : int, optional
        The number of rows ``P`` the distance is averaged over (``"mse"``: its ``P * M``
        entries); default: those of ``r_s``. A caller that splits one correlation into
        blocks of rows passes the whole's count: the blocks' losses then add up to the
        whole's loss, and their gradients are the whole's gradient block by block.

    Returns
    -------
    loss : 0-d array
    dr_s : array shaped like ``r_s``

    Notes
    -----
    ``kl``: ``p = softmax(r_t / tau)``, ``q = softmax(r_s / tau)`` along the last
    axis, ``D = tau^2 / P * sum_rows sum_j p_j (log p_j - log q_j)``, so that
    ``dD/dr_s = tau / P * (q - p)`` (the tau^2 factor keeps gradient magnitudes
    comparable across temperatures, as in Hinton et al. 2015).

    ``mse``: ``D = mean((r_s - r_t)^2)`` over all elements, ``dD/dr_s = 2 (r_s - r_t) / size``.
    """
    xp = array_namespace(r_s, r_t)
    if tuple(r_s.shape) != tuple(r_t.shape):
        raise ValueError(
            f"student and teacher correlations must have the same shape, got {tuple(r_s.shape)} and {tuple(r_t.shape)}"
        )
    if r_s.ndim < 1 or r_s.shape[-1] == 0:
        raise ValueError(f"correlations need a non-empty last axis, got shape {tuple(r_s.shape)}")
    size = math.prod(r_s.shape)
    if rows is not None:
        rows = operator.index(rows)
        if rows < size // r_s.shape[-1]:
            raise ValueError(f"rows={rows} is fewer than the {size // r_s.shape[-1]} rows of the correlations")
    if kind == "kl":
        tau = _setting(tau, "tau", positive=True)
        rows = size // r_s.shape[-1] if rows is None else rows
        shift = _shift_needed(bound, tau, r_s.dtype, r_s.shape[-1], xp=xp)
        z_s, q, log_sum_s = _softmax_parts(r_s, 1.0 / tau, shift, xp=xp)
        z_t, p, log_sum_t = _softmax_parts(r_t, 1.0 / tau, shift, xp=xp)
        # sum_j p_j (log p_j - log q_j) = sum_j p_j (z_t - z_s)_j + log_sum_s - log_sum_t, as sum_j p_j = 1;
        # the first sum row by row (vecdot: one pass, no product array)
        if mutable_namespace(xp):  # our own arrays: reuse their memory
            z_t -= z_s
            q -= p
            q *= tau / rows
        else:
            z_t, q = z_t - z_s, (q - p) * (tau / rows)
        kl = xp.sum(xp.vecdot(p, z_t)) + xp.sum(log_sum_s - log_sum_t)
        return _zero_d(kl * (tau * tau / rows), xp), q
    if kind == "mse":
        size = size if rows is None else rows * r_s.shape[-1]
        diff = r_s - r_t
        return _zero_d(xp.sum(diff * diff) * (1.0 / size), xp), diff * (2.0 / size)
    raise ValueError(f"unknown distance kind {kind!r}; choose one of {KINDS}")


def _setting(value, name, *, positive=False):
    """A numeric setting as a Python float (NumPy scalars and 0-d host numbers welcome)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (number <= 0 if positive else number < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return number


def _threads_setting(threads):
    """``threads`` as a positive Python int (NumPy integers welcome)."""
    try:
        value = operator.index(threads)
    except TypeError:
        value = None
    if value is None or isinstance(threads, bool) or value < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    return value


def _window_setting(window, name):
    """A window as a Python int (``operator.index``: NumPy integers welcome) or None."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise ValueError(f"{name} must be a positive int or None, got {window!r}")
    try:
        return operator.index(window)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or None, got {window!r}") from None


def _student_dtype(students, xp):
    """The one floating dtype of the student's features (the loss's and the gradients' dtype)."""
    dtypes = {str(a.dtype) for a in students}
    if len(dtypes) > 1:
        raise ValueError(f"the student's features must share one dtype, got {sorted(dtypes)}")
    dtype = students[0].dtype
    if not xp.isdtype(dtype, "real floating"):
        raise ValueError(f"student features must be real floating point, got dtype {dtype}")
    return dtype


class HiCDSettings(NamedTuple):
    """The non-array arguments of ``hicd_loss``, coerced to Python values (hashable: static under ``jit``)."""

    windows: tuple
    change_window: int | None
    w_self: float
    w_cross: float
    w_global: float
    kind: str
    tau: float
    eps: float
    check_finite: object


def checked_arguments(student_sem, teacher_sem, student_chg, teacher_chg, *, windows, change_window, w_self,
                      w_cross, w_global, kind, tau, eps, check_finite):
    """``(student pairs, teacher pairs, HiCDSettings)``: the structure checked (pairs, stage counts, change
    features together) before any array is touched, the settings coerced to Python values. ``hicd_loss``
    and the framework adapters (``hicd_core.torch``, ``hicd_core.jax``) share it."""
    if (student_chg is None) != (teacher_chg is None):
        raise ValueError("student_chg and teacher_chg must be given together")
    sem_s, sem_t = tuple(tuple(p) for p in student_sem), tuple(tuple(p) for p in teacher_sem)
    if len(sem_s) != len(sem_t):
        raise ValueError(f"student_sem has {len(sem_s)} stages but teacher_sem has {len(sem_t)}")
    if any(len(p) != 2 for p in sem_s + sem_t):
        raise ValueError("student_sem and teacher_sem entries must be (f1, f2) pairs")
    if not sem_s and student_chg is None:
        raise ValueError("hicd_loss needs at least one semantic stage or change features")
    settings = HiCDSettings(
        tuple(_window_setting(w, f"windows[{i}]") for i, w in enumerate(windows)),
        _window_setting(change_window, "change_window"),
        _setting(w_self, "w_self"), _setting(w_cross, "w_cross"), _setting(w_global, "w_global"),
        str(kind), _setting(tau, "tau", positive=True), _setting(eps, "eps"), check_finite,
    )
    return sem_s, sem_t, settings


def _in_student_dtype(student_sem, teacher_sem, student_chg, teacher_chg):
    """``(xp, student pairs, teacher pairs, student_chg, teacher_chg)``: DLPack-only inputs converted into
    the namespace of the others, the teacher's arrays cast to the student's one dtype (the dtype policy)."""
    n_s = 2 * len(student_sem)
    flat = [f for pair in student_sem for f in pair] + [f for pair in teacher_sem for f in pair]
    xp, flat = as_arrays(*flat, student_chg, teacher_chg)
    flat, (student_chg, teacher_chg) = flat[:-2], flat[-2:]
    dtype = _student_dtype(flat[:n_s] + ([student_chg] if student_chg is not None else []), xp)
    cast = lambda t: t if t is None or t.dtype == dtype else xp.astype(t, dtype)  # noqa: E731
    teachers = [cast(t) for t in flat[n_s:]]
    pairs = lambda a: [(a[2 * i], a[2 * i + 1]) for i in range(len(a) // 2)]  # noqa: E731
    return xp, pairs(flat[:n_s]), pairs(teachers), student_chg, cast(teacher_chg)


def _validate_stages(student_sem, teacher_sem, windows):
    if len(student_sem) != len(teacher_sem):
        raise ValueError(
            f"student_sem has {len(student_sem)} stages but teacher_sem has {len(teacher_sem)}"
        )
    if len(windows) != len(student_sem):
        raise ValueError(f"windows has {len(windows)} entries for {len(student_sem)} semantic stages")
    for l, (s_pair, t_pair) in enumerate(zip(student_sem, teacher_sem)):
        if len(s_pair) != 2 or len(t_pair) != 2:
            raise ValueError(f"stage {l}: student_sem and teacher_sem entries must be (f1, f2) pairs")
        check_pair(*s_pair, names=(f"student stage {l} f1", f"student stage {l} f2"))
        check_pair(*t_pair, names=(f"teacher stage {l} f1", f"teacher stage {l} f2"))
        _check_student_teacher(s_pair[0], t_pair[0], f"stage {l}")
        check_window(s_pair[0].shape, windows[l], f"stage {l} features")


def _check_student_teacher(s, t, where):
    (Ns, _, Hs, Ws), (Nt, _, Ht, Wt) = s.shape, t.shape
    if (Ns, Hs, Ws) != (Nt, Ht, Wt):
        raise ValueError(
            f"{where}: student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
            "must agree in N, H and W (channel counts may differ)"
        )


def _finish(terms, grads_sem, grad_chg, check_finite, *, xp, like):
    """Sum the terms into the loss; check it (``check_finite``: True, False or "auto")."""
    if terms:
        values = list(terms.values())
        loss = values[0]
        for v in values[1:]:
            loss = loss + v
    else:
        loss = xp.zeros((), dtype=like.dtype, device=device(like))
    loss = _zero_d(loss, xp)
    if check_finite == "auto":  # no host sync on a traced value (jit, torch.compile, vmap)
        check_finite = not is_tracing(loss)
    if check_finite and terms and not all_finite(loss):
        bad = [name for name, v in terms.items() if not all_finite(v)]
        raise NonFiniteError(f"non-finite distillation loss in term(s) {', '.join(bad) or 'sum'}")
    return loss, {"sem": grads_sem, "chg": grad_chg, "terms": terms}


def hicd_loss(
    student_sem: Sequence,
    teacher_sem: Sequence,
    student_chg=None,
    teacher_chg=None,
    *,
    windows: Sequence,
    change_window=None,
    w_self: float = 1.0,
    w_cross: float = 1.0,
    w_global: float = 1.0,
    kind: str = "kl",
    tau: float = 0.5,
    eps: float = 1e-6,
    check_finite="auto",
    comm=None,
    threads: int = 1,
):
    """The HiCD loss (SPEC section 2) and its gradients for every student feature.

    Parameters
    ----------
    student_sem, teacher_sem : sequences of (f1, f2) pairs, one per semantic stage
        ``f1`` (t1 phase) and ``f2`` (t2 phase) of shape (N, C_l, H_l, W_l); the
        teacher's channel counts may differ from the student's.
    student_chg, teacher_chg : arrays (N, C, H, W) or None
        Change features; both or neither.
    windows : sequence of int or None, one per stage
    change_window : int or None
    w_self, w_cross, w_global : float
        Term weights; a weight of 0 skips the term's computation.
    kind, tau : see ``correlation_distance``
    eps : float
        Normalisation eps (inside the square root).
    check_finite : bool or "auto"
        If True a non-finite loss raises ``NonFiniteError`` naming the term(s); this
        costs one device-to-host sync. "auto" (default): check unless the loss is a
        traced value (``jax.jit`` / ``grad`` / ``vmap``, ``torch.compile``,
        ``torch.func.vmap``), where no host sync is possible; there the caller checks
        the returned loss. False: never.
    comm : communicator, optional
        Data-parallel training (``hicd_core.parallel``): each rank passes its shard of
        the global batch (all shards one shape). The global-correlation terms then see
        the whole global batch: the pooled vectors of every rank are gathered, in the
        order of the single-process batch, and each rank gets the gradient for its own
        rows, multiplied by the number of ranks, because the parameter gradients are
        averaged over ranks (docs/MATH.md, section 8). The window terms are per image
        and need nothing. None: this process's batch is the whole batch.
    threads : int
        Host threads for the window terms on NumPy (``backend.run_independent``; needs
        threadpoolctl, the ``cpu`` extra): each part's (stage's, change features') window
        terms are independent of the others'. The values are the same for any count. More
        than one pays off for a loss computed on its own; right after multithreaded BLAS
        work (a network's convolutions), OpenBLAS's idle threads keep spinning on the other
        cores for a while and the threads compete with them, so the training loop uses one
        (docs/PERFORMANCE.md). Other namespaces ignore it.

    Returns
    -------
    loss : 0-d array
    grads : dict
        ``grads["sem"]``: list of (g1, g2) shaped like ``student_sem``;
        ``grads["chg"]``: gradient for ``student_chg`` or None;
        ``grads["terms"]``: dict of the weighted terms (0-d arrays) by name,
        ``"sem{l}.self"``, ``"sem{l}.cross"``, ``"sem{l}.global"``, ``"chg.self"``,
        ``"chg.global"``, for logging.

    Notes
    -----
    ::

        L_sem_l = w_self   * (D(SC(s1,w), SC(t1,w)) + D(SC(s2,w), SC(t2,w))) / 2
                + w_cross  *  D(CC(s1,s2,w), CC(t1,t2,w))
                + w_global *  D(GC([s1; s2]), GC([t1; t2]))
        L_chg   = w_self * D(SC(c_s,w_c), SC(c_t,w_c)) + w_global * D(GC(c_s), GC(c_t))

    Per stage the two phases are partitioned and normalised once and shared by
    the self and cross terms; their window-space gradients are summed before the
    single backward through the normalisation.

    Dtype policy: the student's features share one floating dtype; the teacher's
    are cast to it, and the loss and every gradient are in it, on every backend.
    Inputs that only speak DLPack are converted into the namespace of the others.
    Numeric settings may be NumPy scalars (they are read with ``float`` and
    ``operator.index``). The inputs are never written to.
    """
    student_sem, teacher_sem, settings = checked_arguments(
        student_sem, teacher_sem, student_chg, teacher_chg, windows=windows, change_window=change_window,
        w_self=w_self, w_cross=w_cross, w_global=w_global, kind=kind, tau=tau, eps=eps, check_finite=check_finite)
    windows, change_window, w_self, w_cross, w_global, kind, tau, eps, _ = settings
    threads = _threads_setting(threads)
    xp, student_sem, teacher_sem, student_chg, teacher_chg = _in_student_dtype(student_sem, teacher_sem, student_chg,
                                                                               teacher_chg)
    _validate_stages(student_sem, teacher_sem, windows)

    # every correlation here is a Gram product of L2-normalised vectors: |r| <= 1
    dist = lambda r_s, r_t, rows=None: correlation_distance(r_s, r_t, kind, tau, bound=1.0, rows=rows)  # noqa: E731
    parts = [(f"sem{l}", s, t, w, w_cross) for l, (s, t, w) in enumerate(zip(student_sem, teacher_sem, windows))]
    if student_chg is not None:
        check_feature(student_chg, "student_chg")
        check_feature(teacher_chg, "teacher_chg")
        _check_student_teacher(student_chg, teacher_chg, "change features")
        check_window(student_chg.shape, change_window, "change features")
        parts.append(("chg", (student_chg,), (teacher_chg,), change_window, 0.0))
    # the parts' window terms are independent of each other (on host threads with threads > 1);
    # the global terms, which may gather from other ranks, follow in order
    window_terms = run_independent(
        [functools.partial(_window_terms, name, s, t, w, w_self, w_x, eps, dist) for name, s, t, w, w_x in parts],
        xp, threads, costs=[_window_cost(s, w) for _, s, _, w, _ in parts])
    terms, grads = {}, []
    for (name, students, teachers, _, _), (part_terms, g) in zip(parts, window_terms):
        terms.update(part_terms)
        if w_global:
            d = _global_term(f"{name}.global", students, teachers, w_global, eps, dist, terms, comm, xp)
            g = [_add(a, b) for a, b in zip(g, d)]
        grads.append(tuple(_or_zeros(a, f, xp) for a, f in zip(g, students)))
    grad_chg = grads.pop()[0] if student_chg is not None else None
    like = student_sem[0][0] if student_sem else student_chg
    return _finish(terms, grads, grad_chg, check_finite, xp=xp, like=like)


def _add(a, b):
    return b if a is None else a + b


def _or_zeros(g, like, xp):
    return xp.zeros_like(like) if g is None else g


def _window_cost(students, window):
    """The correlation entries a part's window terms compute (``run_independent``'s costs)."""
    N, _, H, W = students[0].shape
    grams = len(students) + (len(students) == 2)  # self per phase, cross for a pair
    return grams * N * H * W * (window * window if window is not None else H * W)


def _window_terms(prefix, students, teachers, window, w_self, w_cross, eps, dist):
    """The window terms of one part (a stage's pair, or the change features): self-correlation of
    each phase (averaged over the phases) and, for a pair, their cross-correlation. Each phase
    is partitioned and normalised once and shared by both terms; its window-space gradients are
    summed before the one backward through the normalisation. Returns the weighted terms by name
    and each phase's gradient (None when both weights are 0: nothing is computed).

    The windows are independent, so on NumPy they are taken a block at a time
    (``_windows_per_block``): each block's correlations stay in the cache from the Gram product
    to the backward product. The distances average over all windows' rows (``rows=``), so the
    gradients are those of one pass over all windows; only the loss's sum is added up in
    another order.
    """
    if not (w_self or w_cross):
        return {}, [None] * len(students)
    X = [window_features(f, window, eps) for f in students]  # (features, cache) per phase
    xp = array_namespace(X[0][0])
    N, K, M, _ = X[0][0].shape
    flat = lambda a: xp.reshape(a, (N * K, M, a.shape[-1]))  # noqa: E731  (windows of every image in a row)
    Xs = [flat(x) for x, _ in X]
    Ts = [flat(window_features(f, window, eps)[0]) for f in teachers]
    step = _windows_per_block(xp, N * K, M)
    sums, blocks = {}, [[] for _ in Xs]
    for first in range(0, N * K, step):
        part = slice(first, first + step)
        block_terms, dX = _window_block([x[part, ...] for x in Xs], [t[part, ...] for t in Ts], w_self, w_cross,
                                        lambda r_s, r_t: dist(r_s, r_t, N * K * M))
        for name, value in block_terms.items():
            sums[name] = _add(sums.get(name), value)
        for phase, d in zip(blocks, dX):
            phase.append(d)
    terms = {f"{prefix}.{name}": value for name, value in sums.items()}
    dX = [xp.reshape(d[0] if len(d) == 1 else xp.concat(d, axis=0), (N, K, M, -1)) for d in blocks]
    return terms, [window_features_backward(d, cache) for d, (_, cache) in zip(dX, X)]


def _windows_per_block(xp, windows, m):
    """How many windows ``_window_terms`` takes at a time: on NumPy (one CPU core per
    elementwise pass) as many as keep a block's ``(M, M)`` correlations within
    ``BLOCK_ELEMENTS``; on other namespaces all at once (a GPU wants few, large kernels)."""
    if not is_numpy_namespace(xp):
        return windows
    return max(1, min(windows, BLOCK_ELEMENTS // (m * m)))


def _window_block(X, T, w_self, w_cross, dist):
    """The weighted window terms of one block of windows (features ``(B, M, C)`` per phase), as
    ``{"self": ..., "cross": ...}``, and each phase's window-space gradient."""
    terms, dX = {}, [None] * len(X)
    if w_self:
        w = w_self / len(X)
        total = None
        for i, (Xi, Ti) in enumerate(zip(X, T)):
            d, dr = dist(gram(Xi), gram(Ti))
            total = _add(total, d)
            dX[i] = gram_backward(dr, Xi) * w  # the weight on the (M, C) side, the smaller one
        terms["self"] = total * w
    if w_cross and len(X) == 2:
        d, dr = dist(gram(X[0], X[1]), gram(T[0], T[1]))
        terms["cross"] = d * w_cross
        e1, e2 = gram_backward(dr, X[0], X[1])
        dX = [_add(dX[0], e1 * w_cross), _add(dX[1], e2 * w_cross)]
    return terms, dX


def _global_term(name, students, teachers, w_global, eps, dist, terms, comm, xp):
    """The weighted global-correlation term of a batch made of ``students`` (its parts in order:
    ``(s1, s2)`` of a stage, ``(c,)`` of the change features); returns each part's gradient.

    ``GC`` of the concatenated parts is the Gram matrix of their pooled vectors stacked in
    that order; with ``comm`` the vectors of every rank are gathered first (part by part, ranks
    in order, the row order of the single-process batch) and this rank keeps the rows of its own
    gradient, times the number of ranks (docs/MATH.md, section 8).
    """
    own = [global_vectors(f, eps) for f in students]
    vectors_t = [global_vectors(f, eps)[0] for f in teachers]
    if comm is not None:
        gather = lambda v: comm.allgather(v)  # noqa: E731  (ranks stacked along axis 0, in rank order)
        all_s, all_t = [gather(v) for v, _ in own], [gather(v) for v in vectors_t]
    else:
        all_s, all_t = [v for v, _ in own], vectors_t
    G_s, G_t = xp.concat(all_s, axis=0), xp.concat(all_t, axis=0)
    d, dR = dist(gram(G_s), gram(G_t))
    terms[name] = d * w_global
    dG = gram_backward(dR * w_global, G_s)
    grads, start = [], 0
    for (v, cache), gathered in zip(own, all_s):
        n = v.shape[0]
        if comm is None:
            rows = dG[start : start + n, ...]
        else:
            rows = dG[start + comm.rank * n : start + (comm.rank + 1) * n, ...] * float(comm.size)
        grads.append(global_vectors_backward(rows, cache))
        start += gathered.shape[0]
    return grads


def feature_mse_loss(student_feats: Sequence, teacher_feats: Sequence, *, check_finite="auto"):
    """Plain feature matching, the usual distillation baseline (FitNets, Romero et al. 2015).

    Parameters
    ----------
    student_feats, teacher_feats : sequences of arrays (N, C, H, W), pairwise the same shape
        (this baseline has no projection layer, so channel counts must agree).
    check_finite : bool or "auto", as in ``hicd_loss``

    Returns
    -------
    loss : 0-d array, ``sum_l mean((s_l - t_l)^2)``
    grads : list of arrays, ``2 (s_l - t_l) / size_l``
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student features but {len(teacher_feats)} teacher features")
    if not student_feats:
        raise ValueError("feature_mse_loss needs at least one feature pair")
    xp = array_namespace(*student_feats, *teacher_feats)
    loss, grads = None, []
    for l, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"feature {l}: student shape {tuple(s.shape)} differs from teacher shape {tuple(t.shape)}")
        d, g = correlation_distance(s, t, kind="mse")
        loss = d if loss is None else loss + d
        grads.append(g)
    loss = _zero_d(loss, xp)
    if check_finite == "auto":
        check_finite = not is_tracing(loss)
    if check_finite and not all_finite(loss):
        raise NonFiniteError("non-finite feature-mse distillation loss")
    return loss, grads
