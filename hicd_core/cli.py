"""The ``hicd`` command: train, eval, predict, degrade, pack.

The only place where a backend is chosen from user input. Every error the user
can cause prints one line (``hicd: error: ...``) and exits with status 2; no
traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from . import backend
from ._version import __version__
from .data import SETTINGS
from .errors import HicdError

__all__ = ["main"]


def _add_backend(p):
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"], help="array backend (default numpy)")


def _none_or_int(text):
    return None if text.lower() == "none" else _positive_int(text)


def _checked(kind, test, what):
    """An argparse ``type`` that converts with ``kind`` and refuses values failing ``test`` (argparse names the option)."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    convert.__name__ = kind.__name__
    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_non_negative = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_positive = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_probability = _checked(float, lambda v: 0 < v < 1, "a probability strictly between 0 and 1")
_rate = _checked(float, lambda v: 0 <= v <= 1, "a rate in [0, 1]")
_dropout_rate = _checked(float, lambda v: 0 <= v < 1, "a rate in [0, 1)")
_strength = _checked(float, lambda v: 0 <= v < 1, "a strength in [0, 1)")
_radius = _checked(int, lambda v: v >= 0, "a non-negative integer (pixels)")
_epoch_count = _checked(int, lambda v: v >= 0, "a non-negative integer (epochs)")
_batch_count = _checked(int, lambda v: v >= 0, "a non-negative integer (batches)")
FILTER_HELP = ("average the change probability over the (2R+1)x(2R+1) window around each pixel before the "
               "threshold (docs/GUIDE.md)")
FILTER_DEFAULT = " (default: the radius the checkpoint was validated with, 0 for none)"


def _pos_weight(text):
    return "auto" if text == "auto" else _positive(text)


_pos_weight.__name__ = "float or 'auto'"
_multiple_of_8 = _checked(int, lambda v: v >= 8 and v % 8 == 0, "a positive multiple of 8")
_label_value = _checked(int, lambda v: 1 <= v <= 255, "in 1..255")
_ignore_value = _checked(int, lambda v: 2 <= v <= 255,
                         "usable: 0 and 1 are the no-change and change values of a label (use e.g. 255 "
                         "for unlabelled pixels of 0/1 masks)")


def _png_path(text):
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text}: this output is written as PNG (name it .png)")
    return text


def _map_path(text):
    if Path(text).suffix.lower() not in (".png", ".tif", ".tiff"):
        raise argparse.ArgumentTypeError(f"{text}: change maps are written as GeoTIFF (.tif) or PNG (.png)")
    return text


BANDS_HELP = ("1-based image bands to use, in the model's order (multispectral GeoTIFFs, e.g. 4 3 2 8; "
              "default: all bands)")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the option (``--help`` still shows the full usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


IGNORE_HELP = ("label value of unlabelled pixels in 0/1 masks, excluded from loss and metrics "
               "(e.g. 255 for BANDON); never 0 or 1, and not 255 with 0/255 masks, where 255 is change")


def build_parser():
    parser = OneLineParser(prog="hicd", description="Change detection across image quality by "
                                     "hierarchical correlation distillation (HiCD).")
    parser.add_argument("--version", action="version", version=f"hicd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    _train_parser(sub)
    _eval_parser(sub)
    _predict_parser(sub)
    _degrade_parser(sub)
    _pack_parser(sub)
    _split_parser(sub)
    return parser


def _train_parser(sub):
    from .experiment import STUDENTS
    from .fc_siam import BOTTLENECKS
    from .networks import DEFAULT_MODEL, MODELS
    from .train import WEIGHT_SCHEDULES

    t = sub.add_parser("train", help="train a teacher (HQ/HQ) or a student (HQ/LQ)",
                       description="Train a teacher on high-quality pairs or a student on high/low-quality pairs. "
                       "Writes last.h5, best.h5 (by validation F1) and log.jsonl into --out; --resume continues. "
                       "Under 'mpiexec -n K' it trains one model on K processes (data parallel; --batch-size is "
                       "the global batch, a multiple of K).")
    t.add_argument("--role", choices=["teacher", "student"], default="teacher")
    t.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                   help=f"the network: tiny-siam-cd (SPEC 4) or fc-siam-diff (Daudt et al. 2018, SPEC 4b; sides "
                        f"multiples of 16); default {DEFAULT_MODEL}")
    t.add_argument("--dropout", type=_dropout_rate, default=None,
                   help="dropout rate of networks with dropout (fc-siam-diff: default 0.2, as published)")
    t.add_argument("--bottleneck", choices=BOTTLENECKS, default=None,
                   help="fc-siam-diff's deepest decoder input: diff (default; |pooled t1 - pooled t2|), t2 (as the "
                        "published code) or mean")
    t.add_argument("--data", default=None, help="LEVIR-CD style folder or HDF5 pack (default: built-in synthetic)")
    t.add_argument("--size", type=_multiple_of_8, default=64, help="synthetic scene size (default 64)")
    t.add_argument("--n-train", type=_positive_int, default=400, help="synthetic training pairs (default 400)")
    t.add_argument("--n-val", type=_positive_int, default=64, help="synthetic validation pairs (default 64)")
    t.add_argument("--setting", choices=SETTINGS, default=None, help="quality setting of t2 (students)")
    t.add_argument("--method", choices=sorted(STUDENTS), default="hicd", help="student variant (default hicd)")
    t.add_argument("--teacher", default=None, help="teacher checkpoint (students)")
    t.add_argument("--student-init", choices=["teacher", "fresh"], default="teacher",
                   help="start a student from the teacher's weights (default) or a fresh init")
    t.add_argument("--epochs", type=_positive_int, default=8)
    t.add_argument("--batch-size", type=_positive_int, default=8)
    t.add_argument("--crop", type=_multiple_of_8, default=None, help="random training crop (real data; a multiple of 8)")
    t.add_argument("--lr", type=_positive, default=2e-3)
    t.add_argument("--weight-decay", type=_non_negative, default=1e-2)
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    t.add_argument("--schedule", choices=["cosine", "poly", "constant"], default="cosine")
    t.add_argument("--dice-weight", type=_non_negative, default=0.0, help="weight of the soft Dice term (default off)")
    t.add_argument("--pos-weight", type=_pos_weight, default=None,
                   help="weight of the change pixels in the BCE (imbalanced real scenes, e.g. 5, or 'auto': "
                        "no-change over change pixels of the training labels; default 1)")
    t.add_argument("--normalize", nargs="?", const="set", choices=["set", "image"], default=None,
                   help="standardise the input channels with statistics of the training set ('set', the default "
                        "of a bare --normalize) or each image by its own ('image'); stored in the checkpoint")
    t.add_argument("--change-crop-rate", type=_rate, default=0.0,
                   help="share of training crops drawn around a change pixel (with --crop; e.g. 0.5)")
    t.add_argument("--colour-jitter", type=_strength, default=0.0, metavar="STRENGTH",
                   help="random gain 1 +- STRENGTH and offset +- STRENGTH/2 per channel of t1 and t2, each its own "
                        "(default 0: off)")
    t.add_argument("--threads", type=_positive_int, default=1,
                   help="host threads for the convolutions, BatchNorm and ReLU on NumPy (default 1; "
                        "more needs threadpoolctl, the cpu extra)")
    t.add_argument("--patience", type=_positive_int, default=None,
                   help="stop once validation F1 has not improved for this many epochs (--epochs is then the budget)")
    t.add_argument("--min-epochs", type=_epoch_count, default=0, metavar="N",
                   help="never stop by --patience before this many epochs (default 0)")
    t.add_argument("--ema", type=_probability, default=None, metavar="DECAY",
                   help="validate, select and save best.h5 with an exponential moving average of the weights "
                        "(decay per step, e.g. 0.99; default off)")
    t.add_argument("--ema-warmup", action="store_true",
                   help="warm the average up: decay min(DECAY, (1 + t) / (10 + t)) at update t (needs --ema)")
    t.add_argument("--precise-bn", type=_batch_count, default=0, metavar="N",
                   help="validate (and save best.h5) with BatchNorm statistics estimated afresh as the mean over N "
                        "training batches, the same ones every epoch (default 0: the running statistics)")
    t.add_argument("--smoothing", type=_positive_int, default=1,
                   help="select the best model (and count --patience) by the mean validation F1 of this many "
                        "epochs (default 1: each epoch's own)")
    t.add_argument("--eval-tile", type=_multiple_of_8, default=None, help="validate scenes larger than this tile by tile")
    t.add_argument("--filter-radius", type=_radius, default=0, metavar="R",
                   help="validate (and select the best model) with maps that "
                        + FILTER_HELP[0].lower() + FILTER_HELP[1:] + " (default 0: off)")
    t.add_argument("--label-threshold", type=_label_value, default=None,
                   help="binarise masks with grey pixels: value >= T is change (e.g. 128)")
    t.add_argument("--ignore-index", type=_ignore_value, default=None, help=IGNORE_HELP)
    t.add_argument("--bands", type=_positive_int, nargs="+", default=None, help=BANDS_HELP)
    t.add_argument("--distill-weight", type=_non_negative, default=1.0, help="weight of the whole distillation loss")
    t.add_argument("--distill-schedule", default="constant", choices=WEIGHT_SCHEDULES,
                   help="the distillation weight over the run: constant (SPEC 2) or cosine (decayed to 0 at the "
                        "last epoch; docs/MATH.md section 9)")
    t.add_argument("--w-self", type=_non_negative, default=None, help="HiCD self-correlation weight")
    t.add_argument("--w-cross", type=_non_negative, default=None, help="HiCD cross-correlation weight")
    t.add_argument("--w-global", type=_non_negative, default=None, help="HiCD global-correlation weight")
    t.add_argument("--kind", choices=["kl", "mse"], default="kl", help="correlation distance (default kl)")
    t.add_argument("--tau", type=_positive, default=0.5, help="softmax temperature of the kl distance")
    t.add_argument("--windows", type=_none_or_int, nargs=3, default=None, metavar="W",
                   help="windows of taps E2 E3 E4 (ints or none; default from the input size)")
    t.add_argument("--change-window", type=_none_or_int, default=None, metavar="W", help="window of d1")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.h5")
    t.add_argument("--no-progress", action="store_true")
    _add_backend(t)


TTA_HELP = ("average the logits over the eight flips and quarter turns of the pair (test-time averaging: "
            "eight forward passes)")


def _eval_parser(sub):
    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset and setting",
                       description="Print the change metrics (percent) of a checkpoint on a dataset, with t2 "
                       "degraded by --setting (seeded) or untouched.")
    e.add_argument("checkpoint")
    e.add_argument("--data", default=None, help="folder or HDF5 pack (default: synthetic test scenes)")
    e.add_argument("--split", default=None, help="split list of a folder (list/<split>.txt)")
    e.add_argument("--size", type=_multiple_of_8, default=64, help="synthetic scene size")
    e.add_argument("--n", type=_positive_int, default=128, help="synthetic test pairs")
    e.add_argument("--setting", choices=SETTINGS, default=None, help="degrade t2 (default: evaluate HQ)")
    e.add_argument("--seed", type=int, default=54321, help="degradation seed of the test set")
    e.add_argument("--batch-size", type=_positive_int, default=8)
    e.add_argument("--tile", type=_multiple_of_8, default=None, help="predict scenes larger than this tile by tile")
    e.add_argument("--tta", action="store_true", help=TTA_HELP)
    e.add_argument("--filter-radius", type=_radius, default=None, metavar="R", help=FILTER_HELP + FILTER_DEFAULT)
    e.add_argument("--label-threshold", type=_label_value, default=None,
                   help="binarise masks with grey pixels: value >= T is change (e.g. 128)")
    e.add_argument("--ignore-index", type=_ignore_value, default=None, help=IGNORE_HELP)
    e.add_argument("--bands", type=_positive_int, nargs="+", default=None,
                   help="1-based image bands (default: those the checkpoint was trained on)")
    _add_backend(e)


def _predict_parser(sub):
    p = sub.add_parser("predict", help="change map of one image pair of any size",
                       description="Predict the change map of T1 -> T2 with tiled sliding-window inference, "
                       "reading and writing window by window (memory bounded by the tile, not the scene). "
                       "GeoTIFF inputs give GeoTIFF outputs on the same grid (CRS, transform), nodata kept.")
    p.add_argument("t1", help="t1 image: GeoTIFF (any bands), PNG or JPEG")
    p.add_argument("t2", help="t2 image on t1's grid (or see --align)")
    p.add_argument("-o", "--output", type=_map_path, required=True,
                   help="change mask: .tif (uint8 GeoTIFF, 0/1, nodata 255) or .png (0/255)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prob", "--probability", dest="prob", type=_map_path, default=None,
                   help="also write the change probability: .tif (float32 GeoTIFF, nodata NaN) or .png (8-bit)")
    p.add_argument("--overlay", type=_png_path, default=None,
                   help="also write T2 with the changes drawn in red (PNG; RGB inputs read whole)")
    p.add_argument("--threshold", type=_probability, default=0.5, help="change where the probability is >= this")
    p.add_argument("--tile", type=_multiple_of_8, default=256)
    p.add_argument("--overlap", type=_checked(int, lambda v: v >= 0, "a non-negative integer"), default=None,
                   help="pixels shared by neighbouring tiles, blended (default: 32, at most a quarter of the tile)")
    p.add_argument("--bands", type=_positive_int, nargs="+", default=None,
                   help="1-based bands of both images, in the model's order (default: those the checkpoint "
                   "was trained on, else all)")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument("--filter-radius", type=_radius, default=None, metavar="R",
                   help=FILTER_HELP + FILTER_DEFAULT + "; --prob writes the averaged map")
    p.add_argument("--align", action="store_true",
                   help="resample t2 onto t1's grid (CRS, transform, size; bilinear) instead of refusing a mismatch")
    p.add_argument("--no-progress", action="store_true")
    _add_backend(p)


def _degrade_parser(sub):
    d = sub.add_parser("degrade", help="build a degraded test set",
                       description="Write a dataset whose t2 is degraded by SETTING (sample i with seed "
                       "[SEED, i]); an .h5 output is an HDF5 pack, anything else an A/B/label folder of PNGs.")
    d.add_argument("--data", default=None, help="folder or HDF5 pack (default: synthetic test scenes)")
    d.add_argument("--split", default=None)
    d.add_argument("--size", type=_multiple_of_8, default=64)
    d.add_argument("--n", type=_positive_int, default=128)
    d.add_argument("--setting", choices=SETTINGS, required=True)
    d.add_argument("--seed", type=int, default=54321)
    d.add_argument("-o", "--output", required=True)


def _pack_parser(sub):
    k = sub.add_parser("pack", help="pack a dataset folder into one HDF5 file",
                       description="Pack a LEVIR-CD style folder (all images one size) into a chunked uint8 "
                       "HDF5 file for fast random-crop training (8 bits per band: keep 16-bit GeoTIFFs as a folder).")
    k.add_argument("data")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--split", default=None)
    k.add_argument("--label-threshold", type=_label_value, default=None,
                   help="binarise masks with grey pixels: value >= T is change (e.g. 128)")
    k.add_argument("--ignore-index", type=_ignore_value, default=None, help=IGNORE_HELP)



def _split_parser(sub):
    s = sub.add_parser("split", help="write train/val/test lists for a dataset folder",
                       description="Split a dataset folder's samples by scene (seeded) and write list/train.txt, "
                       "list/val.txt and list/test.txt into it; every later command then uses that split.")
    s.add_argument("data", help="an A/B/label folder")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fractions", type=_rate, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    s.add_argument("--scene-pattern", default=None,
                   help="regex whose first group names a sample's scene (tiles of one scene stay together)")
    s.add_argument("--force", action="store_true", help="overwrite existing lists")


def _dataset(args, *, n_default=128):
    from .data import ArrayDataset, open_dataset, synthetic_pairs

    if args.data is None:
        return ArrayDataset(*synthetic_pairs(getattr(args, "n", n_default), args.size, 2000))
    path = Path(args.data)
    if path.is_dir():
        from .data import FolderDataset

        return FolderDataset(path, args.split, ignore_value=getattr(args, "ignore_index", None),
                             label_threshold=getattr(args, "label_threshold", None), bands=getattr(args, "bands", None))
    return open_dataset(path, bands=getattr(args, "bands", None))


def cmd_train(args):
    from .data import load_splits
    from .experiment import student_config
    from .parallel import CommunicationError
    from .train import TrainConfig, fit, load_model

    xp = backend.namespace(args.backend)
    comm = _world_communicator()
    if comm is not None:  # before any array is made: each rank of a node on its own GPU (CuPy)
        backend.use_local_device(xp, comm.local_rank)
        comm.prepare(xp)
        if comm.rank == 0:
            print(f"hicd: {comm.size} ranks, collectives over {comm.transport}", file=sys.stderr, flush=True)
    train_set, val_set, _ = load_splits(args.data, size=args.size, n_train=args.n_train, n_val=args.n_val,
                                        n_test=1, seed=args.seed, ignore_value=args.ignore_index,
                                        label_threshold=args.label_threshold, bands=args.bands)
    cfg = TrainConfig(role=args.role, setting=args.setting, epochs=args.epochs, batch_size=args.batch_size,
                      crop=args.crop, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      schedule=args.schedule, dice_weight=args.dice_weight, ignore_index=args.ignore_index,
                      pos_weight=args.pos_weight, normalize={None: False, "set": True}.get(args.normalize, args.normalize), change_crop_rate=args.change_crop_rate,
                      colour_jitter=args.colour_jitter, threads=args.threads, patience=args.patience,
                      min_epochs=args.min_epochs, smoothing=args.smoothing, eval_tile=args.eval_tile,
                      filter_radius=args.filter_radius, bands=args.bands,
                      seed=args.seed, student_init=args.student_init, model=args.model, dropout=args.dropout,
                      bottleneck=args.bottleneck, ema=args.ema, ema_warmup=args.ema_warmup,
                      precise_bn=args.precise_bn)
    teacher = None
    if args.role == "student":
        overrides = {"weight": args.distill_weight, "kind": args.kind, "tau": args.tau,
                     "weight_schedule": args.distill_schedule}
        for name in ("w_self", "w_cross", "w_global"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if args.windows is not None:
            overrides["windows"] = tuple(args.windows)
        if args.change_window is not None:
            overrides["change_window"] = args.change_window
        cfg = replace(cfg, distill=student_config(args.method, args.crop or args.size, **overrides))
        if args.teacher is None and (cfg.student_init == "teacher" or cfg.distill.method != "baseline"):
            raise ValueError("--teacher CHECKPOINT is required for this student")
        if args.teacher is not None:
            teacher, _ = load_model(args.teacher, xp=xp)
    rank0 = comm is None or comm.rank == 0
    try:
        result = fit(cfg, train_set, val_set, args.out, xp=xp, teacher=teacher, resume=args.resume,
                     progress=not args.no_progress and rank0, comm=comm,
                     on_epoch=lambda r: rank0 and print(f"epoch {r['epoch']}: loss {r['train']['loss']:.4f}, "
                                                        f"val F1 {r['val']['f1']:.2f}, {r['pairs_per_s']:.1f} pairs/s",
                                                        flush=True))
    except Exception as exc:
        if comm is None:
            raise
        # one rank failing must not leave the others waiting in a collective: stop the whole job
        where = "" if isinstance(exc, CommunicationError) else f"rank {comm.rank}/{comm.size}: "  # it names the rank
        print(f"hicd: error: {where}{exc}", file=sys.stderr, flush=True)
        comm.abort(2)
        raise
    if rank0:
        print(json.dumps({"best": result.best, "out": str(result.out_dir),
                          **({"world_size": comm.size, "transport": comm.transport} if comm else {})}))


def _world_communicator():
    """An MPI communicator when launched by ``mpiexec -n K`` with K > 1, else None (mpi4py not imported)."""
    from .parallel import MPIComm, launched_by_mpi

    return MPIComm() if launched_by_mpi() > 1 else None


def cmd_eval(args):
    from .data import DegradedView
    from .infer import evaluate
    from .train import load_model

    xp = backend.namespace(args.backend)
    model, ck = load_model(args.checkpoint, xp=xp)
    if args.bands is None:
        args.bands = _trained_bands(ck)
    if args.filter_radius is None:
        args.filter_radius = _trained_filter(ck)
    data = _dataset(args)
    if args.setting is not None:
        data = DegradedView(data, args.setting, args.seed)
    metrics = evaluate(model, data, batch_size=args.batch_size, ignore_index=args.ignore_index, tile=args.tile,
                       tta=args.tta, filter_radius=args.filter_radius)
    print(json.dumps({"checkpoint": args.checkpoint, "setting": args.setting, "n": len(data),
                      **({"tta": True} if args.tta else {}),
                      **({"filter_radius": args.filter_radius} if args.filter_radius else {}), **metrics}))


def _trained_filter(ck):
    """The filter radius a checkpoint's validation maps were scored with (0: none, or not recorded)."""
    return int((ck.get("config") or {}).get("filter_radius") or 0)


def _trained_bands(ck):
    """The bands a checkpoint's training data were read with (None: all, or not recorded)."""
    bands = (ck.get("config") or {}).get("bands")
    return None if bands is None else [int(b) for b in bands]


def cmd_predict(args):
    from .infer import filtered_rows, stream_probability
    from .data.raster import ArraySource, check_same_grid, gdal_environment, is_geotiff
    from .data.scenes import open_source, write_change_maps
    from .train import load_model

    if args.overlap is None:
        args.overlap = min(32, args.tile // 4)
    if args.overlap >= args.tile:
        raise ValueError(f"--overlap {args.overlap} must be smaller than --tile {args.tile}")
    xp = backend.namespace(args.backend)
    model, ck = load_model(args.checkpoint, xp=xp)
    bands = args.bands if args.bands is not None else _trained_bands(ck)
    radius = args.filter_radius if args.filter_radius is not None else _trained_filter(ck)
    if args.align and not (is_geotiff(args.t1) and is_geotiff(args.t2)):
        raise ValueError("--align resamples one GeoTIFF onto another's grid; both inputs must be GeoTIFFs")
    with gdal_environment(args.t1, args.t2, args.output, args.prob), open_source(args.t1, bands) as t1, \
            open_source(args.t2, bands, align_to=t1 if args.align else None) as t2:
        for src in (t1, t2):
            if src.count != model.in_channels:
                raise ValueError(f"{src.name}: {src.count} band(s) but {args.checkpoint} takes "
                                 f"{model.in_channels} (choose them with --bands)")
        check_same_grid(t1, t2)
        if args.overlay and not isinstance(t2, ArraySource):
            raise ValueError("--overlay draws on an RGB image read whole (PNG/JPEG t2); a GeoTIFF output opens "
                             "on top of the images in a GIS instead")
        rows = stream_probability(model, t1, t2, tile=args.tile, overlap=args.overlap, progress=not args.no_progress,
                                   tta=args.tta)
        rows = filtered_rows(rows, radius, t1.height)
        changed, valid_pixels = write_change_maps(rows, t1, t2, mask=args.output, probability=args.prob,
                                                  overlay=args.overlay, threshold=args.threshold)
    print(json.dumps({"output": args.output, "height": t1.height, "width": t1.width,
                      "changed_fraction": round(changed / max(valid_pixels, 1), 6),
                      **({"filter_radius": radius} if radius else {}),
                      **({"nodata_pixels": t1.height * t1.width - valid_pixels} if t1.has_nodata or t2.has_nodata
                         else {})}))


def cmd_degrade(args):
    from .data import DegradedView, build_degraded_set
    from .data.folder import write_dataset_folder

    data = _dataset(args)
    out = Path(args.output)
    if out.suffix.lower() in (".h5", ".hdf5"):
        build_degraded_set(data, args.setting, args.seed, out)
    else:
        write_dataset_folder(DegradedView(data, args.setting, args.seed), out)
    print(json.dumps({"output": str(out), "setting": args.setting, "seed": args.seed, "n": len(data)}))


def cmd_pack(args):
    from .data import FolderDataset, pack_dataset

    ds = FolderDataset(args.data, args.split, ignore_value=args.ignore_index, label_threshold=args.label_threshold)
    pack_dataset(ds, args.output)
    print(json.dumps({"output": args.output, "n": len(ds)}))


def cmd_split(args):
    from .data import FolderDataset, split_scenes, write_split_lists

    names = FolderDataset(args.data).names
    lists = split_scenes(names, seed=args.seed, fractions=args.fractions, scene_pattern=args.scene_pattern)
    paths = write_split_lists(lists, args.data, overwrite=args.force)
    print(json.dumps({part: {"n": len(lists[part]), "list": str(path)} for part, path in paths.items()}))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "degrade": cmd_degrade, "pack": cmd_pack,
            "split": cmd_split}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    backend.keep_host_memory()  # reuse freed host memory across steps (see its docstring)
    try:
        COMMANDS[args.command](args)
    except (HicdError, ValueError, OSError, ImportError) as exc:
        print(f"hicd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hicd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
