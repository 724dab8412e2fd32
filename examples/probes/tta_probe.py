"""Does test-time averaging over the symmetries of the square help on the validation scenes? (issue 27)

    python examples/probes/tta_probe.py runs/reproduce/sztaki-fc-siam-diff/seed1/teacher/best.h5 ...

Each checkpoint (``best.h5`` of a teacher or a student of ``examples/reproduce.py``) is evaluated
on the validation scenes of ``--data`` (the split of ``reproduce.py``) as its training run
validated it: a teacher on the clean pairs, a student with t2 degraded by its setting and its
validation seed (``TrainConfig.val_seed``). Each is evaluated twice: one forward pass, and the
logits averaged over the eight flips and quarter turns of the pair (``infer.predict_logits(...,
tta=True)``, ``hicd predict --tta``). The networks were trained with random flips and quarter
turns, so every one of the eight views is an input like those they learned from. Only
validation scenes are read; nothing is trained. Pooled F1 over the scenes, then each scene's F1.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "probes"))

from hicd_core.data import DegradedView  # noqa: E402
from hicd_core.experiment import PROFILES  # noqa: E402
from hicd_core.train import TrainConfig  # noqa: E402
import reproduce  # noqa: E402
from scale_probe import checkpoint_probe_main, checkpoints  # noqa: E402


def validation_view(val, config):
    """The validation set a run with ``config`` (a checkpoint's ``TrainConfig`` as a dict) selected its model on."""
    if config.get("role") == "student":
        return DegradedView(val, config["setting"], config.get("val_seed", TrainConfig.val_seed))
    return val


def probe_lines(paths, data, *, prof=PROFILES["real"], out=None):
    """Markdown rows ``| checkpoint | validated on | tta | pooled F1 | scene F1 ... |`` and the header."""
    _, val, _, _, _ = reproduce.folder_splits(data, prof, out=out, seed=0)
    lines = ["| checkpoint | validated on | tta | pooled F1 | " + " | ".join(val.names) + " |",
             "|---|---|---|---:|" + "---:|" * len(val.names)]
    for path, model, ck in checkpoints(paths, "tta_probe"):
        config = ck.get("config") or {}
        view = validation_view(val, config)
        seen = "clean pairs" if view is val else f"t2 {config['setting']}"
        for tta in (False, True):
            pooled, scenes = reproduce.evaluate_scenes(model, view, prof, tta=tta)
            lines.append(f"| `{path}` | {seen} | {'8 views' if tta else 'off'} | {pooled['f1']:.2f} | "
                         + " | ".join(f"{scenes[name]:.2f}" for name in val.names) + " |")
    return lines


def main(argv=None):
    checkpoint_probe_main("tta_probe", __doc__.splitlines()[0], probe_lines, argv)


if __name__ == "__main__":
    main()
