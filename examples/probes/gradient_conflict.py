"""Does the HiCD loss pull against the task loss? Cosine of their parameter gradients on validation batches.

    python examples/probes/gradient_conflict.py runs/reproduce/converged/seed0 --setting resolution-x4

For the student checkpoints of one seed and setting of a ``reproduce.py`` run folder
(``<folder>/<setting>/student-*/best.h5`` and ``last.h5``) and that seed's teacher, it
computes, on batches of the synthetic validation scenes with t2 degraded by
``--setting`` (the validation seed of the training runs), the gradient of the task
loss (BCE) and of the HiCD loss (SPEC 2 defaults at 64x64) with respect to every
parameter of the student, each from its own backward pass (``TinySiamCD.backward``
with the task's logit gradient alone, or with the HiCD tap gradients alone), and
prints one JSON line per checkpoint: the cosine of the two flattened gradients, their
norms, and the per-batch cosines. A cosine near -1 means the two losses pull the
student in opposite directions; near 0, they are unrelated; > 0, distillation helps
the task's descent direction. Validation data only: no test scene is read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hicd_core import backend  # noqa: E402
from hicd_core.data import DegradedView, iterate_batches, load_splits  # noqa: E402
from hicd_core.experiment import student_config  # noqa: E402
from hicd_core.functional import bce_with_logits  # noqa: E402
from hicd_core.train import distillation_loss, load_model  # noqa: E402


def flat(grads):
    return np.concatenate([np.ravel(backend.to_host(grads[k])) for k in sorted(grads)]).astype(np.float64)


def cosine(a, b):
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return (float(a @ b) / (na * nb) if na and nb else math.nan), na, nb


def probe(student, teacher, batches, distill):
    per_batch, task_sum, hicd_sum = [], 0.0, 0.0
    for t1, t2_lq, t2_hq, label in batches:
        logits, taps, cache = student.forward(t1, t2_lq, training=True)  # as in a training step (batch statistics)
        _, dlogits = bce_with_logits(logits, label)
        g_task = flat(student.backward(dlogits, cache))
        _, teacher_taps, _ = teacher.forward(t1, t2_hq, training=False, keep_cache=False)
        _, _, tap_grads = distillation_loss(distill, taps, teacher_taps)
        g_hicd = flat(student.backward(dlogits * 0.0, cache, tap_grads))
        per_batch.append(cosine(g_task, g_hicd)[0])
        task_sum, hicd_sum = task_sum + g_task, hicd_sum + g_hicd
    total, n_task, n_hicd = cosine(task_sum, hicd_sum)
    return {"cosine": round(total, 4), "task_grad_norm": round(n_task, 6), "hicd_grad_norm": round(n_hicd, 6),
            "per_batch": [round(c, 4) for c in per_batch]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a reproduce.py seed folder, e.g. runs/reproduce/converged/seed0")
    parser.add_argument("--setting", default="resolution-x4")
    parser.add_argument("--seed", type=int, default=None, help="data seed (default: from the folder name)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--val-seed", type=int, default=12345, help="TrainConfig.val_seed of the runs")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    seed = args.seed if args.seed is not None else int(folder.name.removeprefix("seed"))
    _, val, _ = load_splits(None, size=64, n_train=1, n_val=64, n_test=1, seed=seed)
    lq = DegradedView(val, args.setting, args.val_seed)
    batches = []
    for (t1, t2_hq, label), (_, t2_lq, _) in zip(iterate_batches(val, 8), iterate_batches(lq, 8)):
        batches.append((t1, t2_lq, t2_hq, label))
        if len(batches) == args.batches:
            break
    teacher = load_model(folder / "teacher" / "best.h5")[0]
    distill = student_config("hicd", 64)
    for run in sorted((folder / args.setting).glob("student-*")):
        for which in ("best.h5", "last.h5"):
            if not (run / which).is_file():
                continue
            student, ck = load_model(run / which)
            print(json.dumps({"checkpoint": str(run / which), "epoch": ck["extra"].get("epoch"),
                              **probe(student, teacher, batches, distill)}), flush=True)


if __name__ == "__main__":
    main()
