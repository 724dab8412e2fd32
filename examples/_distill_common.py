"""What examples/distill_torch.py and examples/distill_jax.py share: their options and their data."""

from __future__ import annotations

import argparse

import numpy as np

from hicd_core.data import SETTINGS, degrade, synthetic_pairs


def parse_args(doc, argv=None):
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps per model")
    parser.add_argument("--size", type=int, default=32, help="scene side (a multiple of 8)")
    parser.add_argument("--setting", default="resolution-x4", choices=SETTINGS)
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the HiCD loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 8:
        parser.error(f"--size {args.size}: must be a multiple of 8, at least 16")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    return args


def make_data(args):
    """256 training pairs, 64 held-out pairs with their degraded t2, and ``lq(images, seed)``, the degradation."""
    def lq(images, base):
        return np.stack([degrade(x, args.setting, [base, i]) for i, x in enumerate(images)])

    train = synthetic_pairs(256, args.size, args.seed)
    s1, s2, s_label = synthetic_pairs(64, args.size, args.seed + 2000)
    return train, (s1, s2, lq(s2, 54321), s_label), lq
