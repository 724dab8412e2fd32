"""Does a model see the validation scenes better at a lower resolution? (issue 27, item 3)

    python examples/probes/scale_probe.py runs/reproduce/sztaki-fc-siam-diff/seed4/teacher/best.h5 ...

Each checkpoint (``best.h5`` of a teacher or a student of ``examples/reproduce.py``) is evaluated
on the validation scenes of ``--data`` (the split of ``reproduce.py``) in four views: the clean
pair, t2 alone at 1/4 resolution (``degradations.resolution(t2, 4)``, what a ``resolution-x4``
student is trained on), and both images at 1/2 and at 1/4 resolution. If a teacher trained on
clean pairs scores higher on both images at a lower resolution than on the clean pair, the fine
detail it was given misleads it on these scenes, and a degraded t2 can act on a student like a
smoothing of its inputs rather than as a handicap. Only validation scenes are read; nothing is
trained. Pooled F1 over the scenes, then each scene's F1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from hicd_core.data.degradations import resolution  # noqa: E402
from hicd_core.experiment import PROFILES  # noqa: E402
from reproduce import evaluate_scenes, folder_splits  # noqa: E402

VIEWS = {  # name: (factor of t1, factor of t2)
    "clean": (1, 1),
    "t2 at 1/4": (1, 4),
    "both at 1/2": (2, 2),
    "both at 1/4": (4, 4),
}


class ScaledView:
    """A dataset with t1 and t2 at ``1 / factor`` of their resolution (resampled back to their size)."""

    def __init__(self, dataset, f1, f2):
        self.dataset, self.factors = dataset, (f1, f2)
        self.names = list(getattr(dataset, "names", range(len(dataset))))
        self.ignore_value = getattr(dataset, "ignore_value", None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        t1, t2, label = self.dataset[i]
        return resolution(t1, self.factors[0]), resolution(t2, self.factors[1]), label


def probe_lines(paths, data, *, prof=PROFILES["real"], views=VIEWS, out=None):
    """Markdown rows ``| checkpoint | view | pooled F1 | scene F1 ... |`` and the header."""
    _, val, _, _, _ = folder_splits(data, prof, out=out, seed=0)
    lines = ["| checkpoint | view | pooled F1 | " + " | ".join(val.names) + " |",
             "|---|---|---:|" + "---:|" * len(val.names)]
    for path, model, _ in checkpoints(paths, "scale_probe"):
        for view, (f1, f2) in views.items():
            pooled, scenes = evaluate_scenes(model, ScaledView(val, f1, f2), prof)
            lines.append(f"| `{path}` | {view} | {pooled['f1']:.2f} | "
                         + " | ".join(f"{scenes[name]:.2f}" for name in val.names) + " |")
    return lines


def checkpoints(paths, probe):
    """``(path, model, checkpoint)`` for each ``best.h5`` path; a missing file stops ``probe`` naming it."""
    from hicd_core.networks import load_model

    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"{probe}: no checkpoint at {path}")
        yield (path, *load_model(path))


def checkpoint_probe_main(probe, description, probe_lines, argv=None):
    """The command line of a probe over checkpoints on the validation scenes of ``--data``: prints
    ``probe_lines(checkpoints, data, out=)``."""
    parser = argparse.ArgumentParser(prog=f"{probe}.py", description=description)
    parser.add_argument("checkpoints", nargs="+", help="best.h5 files of examples/reproduce.py")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sztaki-airchange"))
    parser.add_argument("--out", default=str(ROOT / "runs" / probe),
                        help="where a folder without a named split gets its split lists")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        sys.exit(f"{probe}: --data {args.data}: no such folder")
    print("\n".join(probe_lines(args.checkpoints, args.data, out=Path(args.out))))


def main(argv=None):
    checkpoint_probe_main("scale_probe", __doc__.splitlines()[0], probe_lines, argv)


if __name__ == "__main__":
    main()
