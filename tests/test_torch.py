"""hicd_core.torch: hicd_loss as a differentiable PyTorch loss (skips without torch)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hicd_core import hicd_loss as core_hicd_loss  # noqa: E402
from hicd_core import NonFiniteError  # noqa: E402
from hicd_core.torch import hicd_loss  # noqa: E402


# --------------------------------------------------------------------------- an independent transcription of SPEC 2


def _windows(f, w):
    N, C, H, W = f.shape
    if w is None:
        return f.reshape(N, 1, C, H * W).permute(0, 1, 3, 2)
    b = f.reshape(N, C, H // w, w, W // w, w).permute(0, 2, 4, 3, 5, 1)
    return b.reshape(N, (H // w) * (W // w), w * w, C)


def _unit(x, eps):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def _sc(f, w, eps):
    X = _unit(_windows(f, w), eps)
    return X @ X.transpose(-1, -2)


def _cc(f1, f2, w, eps):
    return _unit(_windows(f1, w), eps) @ _unit(_windows(f2, w), eps).transpose(-1, -2)


def _gc(f, eps):
    g = _unit(f.mean(dim=(2, 3)), eps)
    return g @ g.T


def _dist(rs, rt, kind, tau):
    if kind == "mse":
        return ((rs - rt) ** 2).mean()
    rows = rs.numel() // rs.shape[-1]
    p = torch.softmax(rt / tau, -1)
    return tau * tau / rows * (p * (torch.log_softmax(rt / tau, -1) - torch.log_softmax(rs / tau, -1))).sum()


def reference_loss(sem_s, sem_t, c_s, c_t, windows, cw, kind="kl", tau=0.5, eps=1e-6, ws=1.0, wc=1.0, wg=1.0):
    total = 0.0
    for (s1, s2), (t1, t2), w in zip(sem_s, sem_t, windows):
        total = total + ws * (_dist(_sc(s1, w, eps), _sc(t1, w, eps), kind, tau)
                              + _dist(_sc(s2, w, eps), _sc(t2, w, eps), kind, tau)) / 2
        total = total + wc * _dist(_cc(s1, s2, w, eps), _cc(t1, t2, w, eps), kind, tau)
        total = total + wg * _dist(_gc(torch.cat([s1, s2]), eps), _gc(torch.cat([t1, t2]), eps), kind, tau)
    if c_s is not None:
        total = total + ws * _dist(_sc(c_s, cw, eps), _sc(c_t, cw, eps), kind, tau)
        total = total + wg * _dist(_gc(c_s, eps), _gc(c_t, eps), kind, tau)
    return total


def features(seed, dtype=torch.float64, with_change=True, N=2, size=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    sem_s = [(r(N, 3, size, size), r(N, 3, size, size)), (r(N, 4, size // 2, size // 2), r(N, 4, size // 2, size // 2))]
    sem_t = [(r(N, 5, size, size), r(N, 5, size, size)), (r(N, 2, size // 2, size // 2), r(N, 2, size // 2, size // 2))]
    chg = (r(N, 3, size, size), r(N, 6, size, size)) if with_change else (None, None)
    return sem_s, sem_t, chg


def flat_student(sem_s, c_s):
    return [f for p in sem_s for f in p] + ([c_s] if c_s is not None else [])


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("window", [4, None])
@pytest.mark.parametrize("with_change", [True, False])
def test_gradcheck_float64(kind, window, with_change):
    sem_s, sem_t, (c_s, c_t) = features(0, with_change=with_change, N=1, size=4)
    sem_s, sem_t = sem_s[:1], sem_t[:1]
    window = None if window is None else 2
    n = 2 + with_change

    def f(*student):
        chg = student[2] if with_change else None
        return hicd_loss([(student[0], student[1])], sem_t, chg, c_t, windows=[window], change_window=window,
                         kind=kind, tau=0.7)

    inputs = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)][:n]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_hand_gradients_match_torch_autograd_of_an_independent_transcription(kind):
    sem_s, sem_t, (c_s, c_t) = features(1)
    ours = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    theirs = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    kw = dict(kind=kind, tau=0.5)
    loss = hicd_loss([(ours[0], ours[1]), (ours[2], ours[3])], sem_t, ours[4], c_t, windows=[4, None],
                     change_window=4, w_cross=0.5, w_global=2.0, **kw)
    ref = reference_loss([(theirs[0], theirs[1]), (theirs[2], theirs[3])], sem_t, theirs[4], c_t, [4, None], 4,
                         wc=0.5, wg=2.0, **kw)
    (loss * 3.0).backward()
    (ref * 3.0).backward()
    assert loss.dtype == torch.float64 and loss.shape == ()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-15)
    for t in [f for p in sem_t for f in p] + [c_t]:
        assert t.grad is None  # the teacher is a constant


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_full_graph_compile_matches_eager():
    sem_s, sem_t, (c_s, c_t) = features(2, dtype=torch.float32)
    kw = dict(windows=[4, None], change_window=4)

    def f(a, b, c, d, e):
        return hicd_loss([(a, b), (c, d)], sem_t, e, c_t, **kw)

    eager_in = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    comp_in = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(*comp_in)
    want = f(*eager_in)
    got.backward()
    want.backward()
    assert torch.allclose(got, want, rtol=1e-6)
    for a, b in zip(comp_in, eager_in):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_torch_func_grad():
    sem_s, sem_t, (c_s, c_t) = features(3)
    f = lambda s1: hicd_loss([(s1, sem_s[0][1])], sem_t[:1], c_s, c_t, windows=[4], change_window=4)  # noqa: E731
    g = torch.func.grad(f)(sem_s[0][0])
    ref_in = sem_s[0][0].clone().requires_grad_()
    reference_loss([(ref_in, sem_s[0][1])], sem_t[:1], c_s, c_t, [4], 4).backward()
    assert torch.allclose(g, ref_in.grad, rtol=1e-9, atol=1e-15)


def test_core_accepts_tensors_that_require_grad_and_never_writes_them():
    sem_s, sem_t, (c_s, c_t) = features(4)
    student = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    before = [t.detach().clone() for t in student]
    loss, grads = core_hicd_loss([(student[0], student[1]), (student[2], student[3])], sem_t, student[4], c_t,
                                 windows=[4, None], change_window=4)
    loss.backward()  # torch autograd through the core's array-API code: no in-place op in its way
    assert torch.allclose(student[0].grad, grads["sem"][0][0], rtol=1e-9, atol=1e-15)
    assert all(torch.equal(a.detach(), b) for a, b in zip(student, before))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_is_computed_in_float32_and_returned_in_the_students_dtype(low):
    sem_s, sem_t, (c_s, c_t) = features(5, dtype=torch.float32)
    student = [t.to(low).requires_grad_() for t in flat_student(sem_s, c_s)]
    loss = hicd_loss([(student[0], student[1]), (student[2], student[3])], sem_t, student[4], c_t,
                     windows=[4, None], change_window=4)
    loss.backward()
    ref = hicd_loss([(t.to(low).float(), u.to(low).float()) for t, u in sem_s], sem_t, c_s.to(low).float(), c_t,
                    windows=[4, None], change_window=4)
    assert loss.dtype == low and student[0].grad.dtype == low
    assert abs(float(loss.detach()) - float(ref)) < 2e-2 * abs(float(ref)) + 1e-3


def test_mixed_teacher_dtype_and_numpy_scalar_settings():
    sem_s, sem_t, _ = features(6, dtype=torch.float32)
    sem_t = [(a.double(), b.double()) for a, b in sem_t]
    s = [t.clone().requires_grad_() for t in flat_student(sem_s, None)]
    loss = hicd_loss([(s[0], s[1]), (s[2], s[3])], sem_t, windows=[np.int64(4), None], tau=np.float32(0.5),
                     w_self=np.float64(1.0))
    loss.backward()
    assert loss.dtype == torch.float32 and s[0].grad.dtype == torch.float32


def test_eager_non_finite_is_an_error_naming_the_term():
    sem_s, sem_t, _ = features(7)
    bad = sem_s[0][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="sem0"):
        hicd_loss([(bad, sem_s[0][1])], sem_t[:1], windows=[4])


def test_import_hicd_core_loads_neither_torch_nor_jax():
    import subprocess
    import sys

    code = "import sys, hicd_core, hicd_core.train; print(any(m in sys.modules for m in ('torch', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_match_the_cpu():
    sem_s, sem_t, (c_s, c_t) = features(8)
    cpu = [t.clone().requires_grad_() for t in flat_student(sem_s, c_s)]
    gpu = [t.cuda().requires_grad_() for t in flat_student(sem_s, c_s)]
    kw = dict(windows=[4, None], change_window=4)
    loss_cpu = hicd_loss([(cpu[0], cpu[1]), (cpu[2], cpu[3])], sem_t, cpu[4], c_t, **kw)
    loss_gpu = hicd_loss([(gpu[0], gpu[1]), (gpu[2], gpu[3])], [(a.cuda(), b.cuda()) for a, b in sem_t], gpu[4],
                         c_t.cuda(), **kw)
    loss_cpu.backward()
    loss_gpu.backward()
    assert loss_gpu.device.type == "cuda" and torch.allclose(loss_gpu.cpu(), loss_cpu, rtol=1e-10)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(b.grad.cpu(), a.grad, rtol=1e-8, atol=1e-14)
