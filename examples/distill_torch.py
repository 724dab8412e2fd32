"""HiCD inside a plain PyTorch training loop: a frozen torch teacher, a torch student, ``hicd_core.torch.hicd_loss``.

    pip install -e .[torch]            # or: pip install torch==2.13.0 (the CPU build)
    python examples/distill_torch.py   # about a minute on 2 CPU cores
    python examples/distill_torch.py --steps 20 --size 16   # a smoke run

A small Siamese CNN written in torch (conv-BN-ReLU encoder shared by both dates,
|difference| fusion at two scales, a decoder and a 1x1 head) is trained as a
teacher on the built-in synthetic high-quality pairs; then a student of the same
shape, started from the teacher's weights, learns on pairs whose t2 is degraded
(``--setting``), with BCE plus the HiCD
loss against the frozen teacher's encoder taps and change features, the gradient
reaching the student through torch autograd. It prints the losses as they fall and
the final F1 of teacher and student on a held-out degraded test set. Nothing here
is tuned; it shows the wiring, not a result.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core.metrics import change_metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _distill_common import make_data, parse_args  # noqa: E402


def build(torch, nn):
    class TinyTorchCD(nn.Module):
        """Shared encoder (two stages), |e1 - e2| fusion, decoder; returns logits, taps and change features."""

        def __init__(self, w1=8, w2=16):
            super().__init__()
            cbr = lambda a, b, s=1: nn.Sequential(nn.Conv2d(a, b, 3, s, 1), nn.BatchNorm2d(b), nn.ReLU())  # noqa: E731
            self.enc1 = nn.Sequential(cbr(3, w1), cbr(w1, w1))
            self.enc2 = nn.Sequential(cbr(w1, w2, 2), cbr(w2, w2))
            self.dec2 = cbr(w2, w1)
            self.dec1 = cbr(2 * w1, w1)
            self.head = nn.Conv2d(w1, 1, 1)

        def forward(self, x1, x2):
            n = x1.shape[0]
            e1 = self.enc1(torch.cat([x1, x2]))
            e2 = self.enc2(e1)
            d = nn.functional.interpolate(self.dec2((e2[:n] - e2[n:]).abs()), scale_factor=2.0, mode="nearest")
            d1 = self.dec1(torch.cat([d, (e1[:n] - e1[n:]).abs()], dim=1))
            return self.head(d1), {"E1": (e1[:n], e1[n:]), "E2": (e2[:n], e2[n:])}, d1

    return TinyTorchCD


def f1_of(torch, model, t1, t2, label):
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(t1), torch.from_numpy(t2))[0]
    return change_metrics((logits[:, 0] >= 0).numpy(), label)["f1"]


def main(argv=None):
    args = parse_args(__doc__, argv)
    try:
        import torch
        from torch import nn
    except ImportError:
        print("distill_torch.py: error: needs PyTorch (pip install -e .[torch])", file=sys.stderr)
        return 2
    from hicd_core.torch import hicd_loss

    torch.manual_seed(args.seed)
    (t1, t2, label), (s1, s2, s2_lq, s_label), lq = make_data(args)
    bce = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(args.seed)
    Net = build(torch, nn)
    windows = (4 if args.size // 2 >= 8 and (args.size // 2) % 4 == 0 else None,)

    def train(model, teacher=None):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        for step in range(1, args.steps + 1):
            idx = rng.choice(len(t1), 8, replace=False)
            x1, hq = torch.from_numpy(t1[idx]), torch.from_numpy(t2[idx])
            x2 = hq if teacher is None else torch.from_numpy(lq(t2[idx], int(rng.integers(2**31))))
            y = torch.from_numpy(label[idx]).float()[:, None]
            logits, taps, d1 = model(x1, x2)
            task = bce(logits, y)
            distill = torch.zeros(())
            if teacher is not None:
                with torch.no_grad():
                    _, t_taps, t_d1 = teacher(x1, hq)
                distill = args.weight * hicd_loss([taps["E2"]], [t_taps["E2"]], d1, t_d1, windows=windows,
                                                  change_window=4)
            opt.zero_grad()
            (task + distill).backward()
            opt.step()
            if step % max(args.steps // 6, 1) == 0 or step == 1:
                role = "teacher" if teacher is None else "student"
                print(f"{role} step {step:4d}: BCE {task.item():.4f}  HiCD {distill.item():.4f}", flush=True)
        model.eval()
        return model

    teacher = train(Net())
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = Net()
    student.load_state_dict(teacher.state_dict())  # the project's default start (examples/train_cd.py)
    student = train(student, teacher)
    print(f"held-out {args.setting} test pairs: teacher HQ/HQ F1 {f1_of(torch, teacher, s1, s2, s_label):.2f}, "
          f"teacher HQ/LQ F1 {f1_of(torch, teacher, s1, s2_lq, s_label):.2f}, "
          f"HiCD student F1 {f1_of(torch, student, s1, s2_lq, s_label):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
