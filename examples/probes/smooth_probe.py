"""Does averaging the change probability over a window before the threshold help on the validation scenes? (issue 27)

    python examples/probes/smooth_probe.py runs/reproduce/sztaki-fc-siam-diff/seed1/teacher/best.h5 ...

Each checkpoint (``best.h5`` of a teacher or a student of ``examples/reproduce.py``) is evaluated on
the validation scenes of ``--data`` as its training run validated it (a teacher on the clean pairs, a
student with t2 degraded by its setting and validation seed), scene by scene as the studies score a
test scene (``reproduce.evaluate_scenes``), once per radius ``r`` of ``RADII``: the change
probability averaged over a ``(2 r + 1)²`` window (``filter_radius``, ``infer.box_mean``, borders
mirrored), then cut at 0.5; ``r = 0`` is the map the studies without ``filter_radius`` score. SZTAKI's masks
outline whole changed areas (fields, building lots) while a network's map is speckled inside them,
so a window mean may fill holes and drop isolated pixels, or may erase small changes. Only
validation scenes are read; nothing is trained. Pooled F1 over the scenes, then each scene's F1.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "probes"))

from hicd_core.experiment import PROFILES  # noqa: E402
import reproduce  # noqa: E402
from scale_probe import checkpoint_probe_main, checkpoints  # noqa: E402
from tta_probe import validation_view  # noqa: E402

RADII = (0, 2, 4, 8, 12, 16, 24)


def probe_lines(paths, data, *, prof=PROFILES["real"], out=None, radii=RADII):
    """Markdown rows ``| checkpoint | validated on | radius | pooled F1 | scene F1 ... |`` and the header."""
    _, val, _, _, _ = reproduce.folder_splits(data, prof, out=out, seed=0)
    lines = ["| checkpoint | validated on | radius | pooled F1 | " + " | ".join(val.names) + " |",
             "|---|---|---:|---:|" + "---:|" * len(val.names)]
    for path, model, ck in checkpoints(paths, "smooth_probe"):
        config = ck.get("config") or {}
        view = validation_view(val, config)
        seen = "clean pairs" if view is val else f"t2 {config['setting']}"
        for r in radii:  # scored as the studies score a scene (reproduce.evaluate_scenes), with the window mean
            pooled, scenes = reproduce.evaluate_scenes(model, view, replace(prof, filter_radius=r))
            lines.append(f"| `{path}` | {seen} | {r} | {pooled['f1']:.2f} | "
                         + " | ".join(f"{scenes[name]:.2f}" for name in val.names) + " |")
    return lines


def main(argv=None):
    checkpoint_probe_main("smooth_probe", __doc__.splitlines()[0], probe_lines, argv)


if __name__ == "__main__":
    main()
