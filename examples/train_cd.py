"""Train a teacher, a baseline student and a HiCD student; compare them on low-quality test pairs.

    python examples/train_cd.py                       # synthetic data, resolution-x4, minutes on 2 cores
    python examples/train_cd.py --quick               # a smoke run in well under 2 minutes
    python examples/train_cd.py --setting multi --seed 1
    python examples/train_cd.py --data path/to/LEVIR-CD --crop 64
    python examples/train_cd.py --backend cupy        # on a GPU
    python examples/train_cd.py --model fc-siam-diff --dropout 0   # the second network (SPEC 4b)

With no arguments it generates the built-in synthetic scenes (no download),
trains the teacher on high-quality pairs, then two students on pairs whose t2
is degraded by ``--setting`` (one with the task loss only, one with the HiCD
loss against the frozen teacher), evaluates all on one held-out degraded test
set and prints the table. Into ``--out`` (default ``runs/<time>``) it writes
``results.json``, ``predictions.png`` (test pairs: t1, degraded t2, label, each
model's prediction) and every model's checkpoints and logs.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hicd_core import backend  # noqa: E402
from hicd_core.cli import OneLineParser  # noqa: E402
from hicd_core.data import SETTINGS  # noqa: E402
from hicd_core.experiment import PROFILES, format_table, run_comparison, write_json  # noqa: E402
from hicd_core.data.folder import image_grid, to_uint8, write_png  # noqa: E402
from hicd_core.networks import DEFAULT_MODEL, MODELS  # noqa: E402


def prediction_panel(models, test_hq, test_lq, n=4, gap=3):
    """Rows of test pairs: t1 | degraded t2 | label | teacher on HQ | teacher on LQ | each student on LQ."""
    mask = lambda m: np.repeat(to_uint8(np.asarray(m, bool))[:, :, None], 3, axis=2)  # noqa: E731
    rows = []
    for i in range(min(n, len(test_lq))):
        t1, t2_lq, label = test_lq[i]
        t2_hq = test_hq[i][1]
        tiles = [to_uint8(t1), to_uint8(t2_lq), mask(label == 1)]
        for name, model in models.items():
            pairs = [(t1, t2_hq), (t1, t2_lq)] if name == "teacher" else [(t1, t2_lq)]
            for a, b in pairs:
                xp = model.xp
                logits = model.predict_logits(backend.from_host(a[None], xp), backend.from_host(b[None], xp))
                tiles.append(mask(backend.to_host(logits)[0, 0] >= 0.0))  # sigmoid(z) >= 0.5
        rows.append(tiles)
    return image_grid(rows, gap)


def verdict(rows):
    """One line: the HiCD student against the baseline student in this run, and where the multi-seed answer is."""
    f1 = {r["method"]: r["f1"] for r in rows}
    if "student HiCD" not in f1 or "student baseline" not in f1:
        return ""
    d = f1["student HiCD"] - f1["student baseline"]
    word = "above" if d > 0 else "below" if d < 0 else "level with"
    return (f"verdict: the HiCD student is {abs(d):.2f} F1 {word} the baseline student in this run (one seed, "
            "students from the teacher); across seeds and trained to convergence: docs/studies/converged.md")


def panel_titles(models):
    """The column titles of ``prediction_panel``, in its column order."""
    names = {"hicd": "HiCD"}
    titles = ["t1", "t2 (degraded)", "label"]
    for name in models:
        titles += (["teacher,\nHQ pair", "teacher,\nLQ pair"] if name == "teacher"
                   else [f"{names.get(name, name)}\nstudent"])
    return titles


def save_png(array, path, scale=1, titles=None, gap=3):
    """Write the panel (nearest-neighbour enlarged by ``scale``), with a band of column ``titles`` above it
    (equal columns, ``gap`` pixels apart before scaling); skipped with a note without Pillow."""
    if scale != 1:
        array = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    try:
        if titles:
            from PIL import Image, ImageDraw

            band = 30
            img = Image.new("RGB", (array.shape[1], array.shape[0] + band), "white")
            img.paste(Image.fromarray(array), (0, band))
            draw = ImageDraw.Draw(img)
            column = (array.shape[1] + gap * scale) / len(titles)
            for k, title in enumerate(titles):
                box = draw.multiline_textbbox((0, 0), title, align="center")
                draw.multiline_text((k * column + (column - gap * scale - (box[2] - box[0])) / 2, 2), title,
                                    fill="black", align="center")
            array = np.asarray(img)
        write_png(array, path)
    except ImportError as exc:
        print(f"{exc}: skipping {path}")


def main(argv=None):
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (32x32 scenes, a few epochs)")
    parser.add_argument("--setting", default="resolution-x4", choices=SETTINGS, help="quality setting of t2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="LEVIR-CD style folder or HDF5 pack (default: synthetic)")
    parser.add_argument("--crop", type=int, default=None, help="training crop size for real data")
    parser.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"the network of all three models (default {DEFAULT_MODEL})")
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout rate of networks with dropout (fc-siam-diff: 0.2 as published by default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such folder or file")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    if args.crop is not None and (args.crop < 8 or args.crop % 8):
        parser.error(f"--crop {args.crop}: must be a positive multiple of 8")
    backend.keep_host_memory()  # reuse freed host memory across steps (see its docstring)

    out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    profile = PROFILES["quick" if args.quick else "default"]
    if args.crop:
        profile = replace(profile, crop=args.crop)
    profile = replace(profile, model=args.model, dropout=args.dropout)
    result = run_comparison(out, setting=args.setting, seed=args.seed, data=args.data, profile=profile,
                            backend_name=args.backend, progress=not args.no_progress)
    table = format_table(result["rows"])
    print()
    print(f"setting {args.setting}, seed {args.seed}, {result['seconds']:.0f} s "
          f"({platform.processor() or platform.machine()}, backend {args.backend})")
    print(table)
    print(verdict(result["rows"]))
    write_json(out / "results.json", {"setting": args.setting, "seed": args.seed, "seconds": result["seconds"],
                                      "data": args.data or "synthetic", "rows": result["rows"]})
    save_png(prediction_panel(result["models"], result["test_hq"], result["test_lq"]), out / "predictions.png",
             scale=2 if profile.size <= 64 else 1, titles=panel_titles(result["models"]))
    print(f"\nwrote {out / 'results.json'} and {out / 'predictions.png'}")
    return result


if __name__ == "__main__":
    from hicd_core.errors import HicdError

    try:
        main()
    except (HicdError, ValueError, OSError, ImportError) as exc:  # user errors: one line, exit 2, as `hicd` does
        print(f"train_cd.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("train_cd.py: interrupted (rerun with the same --out to resume)", file=sys.stderr)
        sys.exit(130)
