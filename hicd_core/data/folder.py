"""Real change-detection datasets: LEVIR-CD / WHU-CD / DSIFN folders, HDF5 packs, augmentation.

Folder layout::

    root/A/<name>.png       t1 images (PNG, JPG: RGB, 8 bits per channel; GeoTIFF: any bands)
    root/B/<name>.png       t2 images, same names, sizes and band counts
    root/label/<name>.png   change labels: 0/255 or 0/1 (1 or 255 = change), single band
    root/list/train.txt     optional: one name per line (with or without extension)

Labels are returned as uint8 {0, 1}; with ``ignore_value`` set (BANDON marks
unlabelled pixels with 255), labels are read as 0 = no change, 1 = change and
``ignore_value`` = unlabelled, and ``ignore_value`` passes through unchanged so
that the losses and metrics can exclude it. Grayscale images are converted to RGB
by repeating the channel (documented conversion); RGBA drops alpha; any other
mode, a missing counterpart, mismatched sizes or unexpected label values raise
``DatasetError`` naming the file. TIFFs (``.tif``/``.tiff``) are read through
rasterio when it is installed (the ``geo`` extra): every band as stored, integer
types scaled by their maximum (``hicd_core.data.raster``), a chosen subset with
``bands``; without rasterio, Pillow reads 8-bit RGB TIFFs as before.

Samples follow ``synthetic_pairs``' conventions: ``t1, t2`` float32 (C, H, W) (C = 3 for
RGB) in [0, 1], ``label`` uint8 (H, W).
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import DatasetError
from ..io import atomic_path
from ..progress import Progress
from .raster import GEOTIFF_SUFFIXES, checked_bands, select_bands
from .degradations import degrade

__all__ = [
    "FolderDataset",
    "H5Dataset",
    "ArrayDataset",
    "DegradedView",
    "pack_dataset",
    "build_degraded_set",
    "open_dataset",
    "random_crop_flip",
    "random_colour",
    "change_fraction",
    "validate_dataset",
    "InMemory",
    "channel_stats",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PACK_FORMAT = "hicd-dataset"
PACK_VERSION = 2  # 2: a SHA-256 of the file in a 512-byte HDF5 user block (1: none)
_PACK_SEAL = b"hicd-dataset v2 sha256="
_USERBLOCK = 512


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image folders needs Pillow: pip install hicd[io]") from None
    return Image


_MODES = ("L", "P", "LA", "RGBA", "RGB", "1")  # 8-bit grayscale or RGB (alpha dropped)


def _check_mode(path, mode):
    if mode not in _MODES:
        raise DatasetError(f"{path}: unsupported image mode {mode!r} (expected 8-bit RGB or grayscale)")


def _check_sizes(a_path, b_path, l_path, a_size, b_size, label_size):
    """The two dates and the label of a sample must have one size ``(H, W)``."""
    if b_size != a_size:
        raise DatasetError(f"{b_path}: size {b_size} differs from {a_path} {a_size}")
    if label_size != a_size:
        raise DatasetError(f"{l_path}: size {label_size} differs from {a_path} {a_size}")


def _rasterio_reads(path) -> bool:
    """True for a TIFF when rasterio is installed: it is then read band by band, as stored."""
    return Path(path).suffix.lower() in GEOTIFF_SUFFIXES and importlib.util.find_spec("rasterio") is not None


def _tiff_hint(path):
    if Path(path).suffix.lower() in GEOTIFF_SUFFIXES:
        return "; multi-band or non-8-bit TIFFs need rasterio: pip install 'hicd[geo]'"
    return ""


def read_image(path: Path, bands=None) -> np.ndarray:
    """An image file as float32 ``(C, H, W)``: RGB in [0, 1], or a TIFF's bands.

    PNG, JPEG, BMP (and TIFF without rasterio) are read with Pillow as RGB;
    grayscale is repeated to 3 channels. TIFFs, when rasterio is installed, are read
    band by band as stored (integers scaled by their type's maximum, see
    ``hicd_core.data.raster``). ``bands``: 1-based band indices to keep, in order.
    """
    if _rasterio_reads(path):
        from .raster import read_raster

        return read_raster(path, bands)
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            _check_mode(path, im.mode)
            arr = np.asarray(im.convert("RGB"))
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for unreadable files
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc}){_tiff_hint(path)}") from None
    image = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return select_bands(image, bands, name=str(path))


def _image_header(path, Image):
    """``(bands, (H, W))`` of an image file without decoding it (bands as ``read_image`` returns them)."""
    if _rasterio_reads(path):
        from .raster import raster_shape

        count, height, width = raster_shape(path)
        return count, (height, width)
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for unreadable files
        raise DatasetError(f"{path}: cannot read image ({type(exc).__name__}: {exc}){_tiff_hint(path)}") from None
    _check_mode(path, mode)
    return 3, (height, width)


def read_label(path: Path, ignore_value: int | None = None, threshold: int | None = None) -> np.ndarray:
    """A label file as uint8 (H, W): 0 = no change, 1 = change, ``ignore_value`` kept as is.

    ``threshold``: binarise any 8-bit mask as ``value >= threshold`` (for masks with
    anti-aliased grey pixels, e.g. 128); without it, values other than 0/1 or 0/255
    raise ``DatasetError``.
    """
    if _rasterio_reads(path):
        from .raster import read_raster_label

        arr = read_raster_label(path)
    else:
        Image = _pil()
        try:
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"{path}: cannot read label ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 3:
        if not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, min(arr.shape[2], 3))):
            raise DatasetError(f"{path}: label has {arr.shape[2]} differing channels; expected a single-channel mask")
        arr = arr[..., 0]
    values = set(np.unique(arr).tolist())
    if threshold is not None:
        if ignore_value is not None:
            keep = arr == ignore_value
            return np.where(keep, ignore_value, arr >= threshold).astype(np.uint8)
        return (arr >= threshold).astype(np.uint8)
    if ignore_value is not None:
        if ignore_value == 255 and 255 in values and 1 not in values:
            raise DatasetError(f"{path}: label values {sorted(values)} with ignore value 255: in a 0/255 mask 255 is "
                               "the change value, so every change pixel would be ignored; use an ignore value only "
                               "for 0/1 masks that mark unlabelled pixels")
        allowed = {0, 1, ignore_value}
        if not values <= allowed:
            raise DatasetError(f"{path}: label values {sorted(values)}; expected a subset of {sorted(allowed)}")
        return arr.astype(np.uint8)
    if values <= {0, 1}:
        return arr.astype(np.uint8)
    if values <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    shown = sorted(values)
    shown = shown if len(shown) <= 8 else shown[:4] + ["..."] + shown[-3:]
    raise DatasetError(f"{path}: label values {shown}; expected 0/255 or 0/1 "
                       "(grey anti-aliased masks: binarise with a label threshold, e.g. --label-threshold 128)")


class FolderDataset:
    """A change-detection dataset folder (LEVIR-CD layout), read lazily.

    Parameters
    ----------
    root : path
    split : str, optional
        Use the names in ``root/list/<split>.txt``; all files of ``A/`` otherwise.
    ignore_value : int, optional
        Label value marking unlabelled pixels (passed through, see module docs).
    label_threshold : int, optional
        Binarise labels as ``value >= label_threshold`` (masks with grey pixels).
    bands : sequence of int, optional
        1-based bands of the images to use, in this order (multispectral TIFFs, read
        through rasterio; e.g. ``(4, 3, 2, 8)``); all bands by default. Every sample
        must give the same number of bands.

    ``len(ds)`` and ``ds[i] -> (t1, t2, label)``; ``ds.names`` lists the files.
    Missing counterparts are reported when the dataset is opened; sizes and label
    values when a sample is read (``ds.validate()`` reads all of them).
    """

    def __init__(self, root, split: str | None = None, *, ignore_value: int | None = None,
                 label_threshold: int | None = None, bands=None):
        self.root = Path(root)
        if bands is not None:
            bands = tuple(int(b) for b in bands)
            if not bands or min(bands) < 1:
                raise DatasetError(f"bands are 1-based band indices, got {list(bands)}")
        self.bands = bands
        self.ignore_value = ignore_value
        if label_threshold is not None and not 1 <= int(label_threshold) <= 255:
            raise DatasetError(f"label threshold must be in 1..255, got {label_threshold}")
        self.label_threshold = None if label_threshold is None else int(label_threshold)
        for sub in ("A", "B", "label"):
            if not (self.root / sub).is_dir():
                raise DatasetError(f"{self.root}: missing folder {sub}/ (expected A/, B/ and label/)")
        files = {p.stem: p for p in sorted((self.root / "A").iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        if split is not None:
            list_file = self.root / "list" / f"{split}.txt"
            if not list_file.is_file():
                raise DatasetError(f"{list_file}: split list not found")
            wanted = [Path(line.strip()).stem for line in list_file.read_text().splitlines() if line.strip()]
            missing = [w for w in wanted if w not in files]
            if missing:
                raise DatasetError(f"{list_file}: names not found in {self.root / 'A'}: {missing[:5]}")
            files = {w: files[w] for w in wanted}
        if not files:
            raise DatasetError(f"{self.root / 'A'}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.names = list(files)
        self._paths = []
        for stem, a_path in files.items():
            b_path = self._find(self.root / "B", stem, a_path)
            l_path = self._find(self.root / "label", stem, a_path)
            self._paths.append((a_path, b_path, l_path))

    @staticmethod
    def _find(folder: Path, stem: str, counterpart: Path) -> Path:
        for ext in (counterpart.suffix, *IMAGE_EXTENSIONS):
            for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
        raise DatasetError(f"{counterpart}: no counterpart {stem}.* in {folder}")

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, i):
        a_path, b_path, l_path = self._paths[i]
        t1, t2 = read_image(a_path, self.bands), read_image(b_path, self.bands)
        _check_bands(a_path, b_path, len(t1), len(t2))
        label = read_label(l_path, self.ignore_value, self.label_threshold)
        _check_sizes(a_path, b_path, l_path, t1.shape[1:], t2.shape[1:], label.shape)
        return t1, t2, label

    def validate(self, indices=None, *, progress=False):
        """Check samples before training (raises the first ``DatasetError``, naming the file); returns the count.

        Fast: image headers only (readable, supported mode, the two dates and the label of
        one size), and the label's values, which need the label decoded (small, one
        channel). ``indices``: the samples to check (all by default); ``progress``: a tqdm
        bar when tqdm is installed (large sets).
        """
        Image = _pil()
        indices = range(len(self)) if indices is None else indices
        bar = Progress(len(indices), f"checking {self.root}", progress)
        first = None  # (path, band count) of the first sample: every sample must match it
        for i in indices:
            a_path, b_path, l_path = self._paths[i]
            (a_count, a_size), (b_count, b_size) = (_image_header(path, Image) for path in (a_path, b_path))
            if self.bands is not None:  # the bands exist in both images (the check read_image makes)
                a_count, b_count = (len(checked_bands(self.bands, count, path))
                                    for path, count in ((a_path, a_count), (b_path, b_count)))
            _check_bands(a_path, b_path, a_count, b_count)
            if first is None:
                first = (a_path, a_count)
            elif a_count != first[1]:
                raise DatasetError(f"{a_path}: {a_count} band(s), but {first[0]} has {first[1]}; every sample "
                                   "of a dataset needs the same bands")
            label = read_label(l_path, self.ignore_value, self.label_threshold)
            _check_sizes(a_path, b_path, l_path, a_size, b_size, label.shape)
            bar.update(1)
        bar.close()
        return len(indices)


def _check_bands(a_path, b_path, a_count, b_count):
    if a_count != b_count:
        raise DatasetError(f"{b_path}: {b_count} band(s), but {a_path} has {a_count}")


def validate_dataset(dataset, *, progress=False):
    """Check every sample behind ``dataset`` before training, as cheaply as its kind allows.

    Folders check headers and labels (``FolderDataset.validate``); views (``Subset``,
    ``Repeat``, ``DegradedView``) check what they show; in-memory data needs nothing.
    Returns the number of samples checked.
    """
    validate = getattr(dataset, "validate", None)
    if validate is not None:
        return validate(progress=progress)
    inner = getattr(dataset, "dataset", None)
    return validate_dataset(inner, progress=progress) if inner is not None else 0


class ArrayDataset:
    """In-memory arrays ``(t1 (n, 3, H, W), t2, label (n, H, W))`` as a dataset (e.g. ``synthetic_pairs``)."""

    def __init__(self, t1, t2, label, names=None):
        if not (len(t1) == len(t2) == len(label)):
            raise DatasetError(f"ArrayDataset: lengths differ: {len(t1)}, {len(t2)}, {len(label)}")
        self.t1, self.t2, self.label = t1, t2, label
        self.names = list(names) if names is not None else [f"{i:06d}" for i in range(len(t1))]
        self.ignore_value = None

    def __len__(self):
        return len(self.t1)

    def __getitem__(self, i):
        return self.t1[i], self.t2[i], self.label[i]


class DegradedView:
    """A dataset whose t2 is degraded by ``setting``; sample ``i`` uses seed ``[seed, i]``.

    Deterministic and lazy: the same (dataset, setting, seed) gives the same
    low-quality images on any machine. ``hq(i)`` returns the untouched sample.
    """

    def __init__(self, dataset, setting: str, seed: int):
        self.dataset, self.setting, self.seed = dataset, setting, int(seed)
        self.names = list(getattr(dataset, "names", range(len(dataset))))
        self.ignore_value = getattr(dataset, "ignore_value", None)
        degrade(np.zeros((3, 8, 8), np.float32), setting, 0)  # fail early on an unknown setting

    def __len__(self):
        return len(self.dataset)

    def hq(self, i):
        return self.dataset[i]

    def __getitem__(self, i):
        t1, t2, label = self.dataset[i]
        return t1, degrade(t2, self.setting, [self.seed, i]), label


def build_degraded_set(dataset, setting: str, seed: int, path) -> Path:
    """Write the low-quality test set of ``dataset`` under ``setting`` to an HDF5 pack.

    The protocol: t1 and the label untouched, t2 of sample ``i`` degraded with
    ``degrade(t2, setting, [seed, i])``; the pack records the setting and seed.
    """
    return pack_dataset(DegradedView(dataset, setting, seed), path,
                        attrs={"degradation": json.dumps({"setting": setting, "seed": int(seed)})})


def pack_dataset(dataset, path, *, names=None, attrs=None) -> Path:
    """Write a dataset into one HDF5 file (uint8, one chunk per image), atomically.

    ``dataset`` is anything with ``len`` and ``[i] -> (t1, t2, label)`` of one size
    (a ``FolderDataset``, an ``H5Dataset``, or a tuple of arrays as returned by
    ``synthetic_pairs``). Images are stored as uint8 (``round(255 x)``), any number of
    bands: 8 bits per band, so 16-bit rasters lose precision (up to 1/510 of their range);
    train on their folder instead. The disk
    space is reserved before HDF5 writes (a full disk is an ``OSError``, the target
    untouched), and the SHA-256 of the file goes into its 512-byte user block
    (``hicd-dataset v2 sha256=<hex>``), which ``H5Dataset`` checks before parsing.
    """
    if isinstance(dataset, tuple) and len(dataset) == 3:
        dataset = ArrayDataset(*dataset)
    n = len(dataset)
    if n == 0:
        raise DatasetError("pack_dataset: the dataset is empty")
    names = list(names or getattr(dataset, "names", [f"{i:06d}" for i in range(n)]))
    first = dataset[0]
    shape = first[0].shape
    with atomic_path(path) as tmp:
        _reserve(tmp, n * (2 * int(np.prod(shape)) + int(np.prod(shape[1:]))), chunks=3 * n)
        with h5py.File(tmp, "w", userblock_size=_USERBLOCK) as f:
            f.attrs["format"] = PACK_FORMAT
            f.attrs["format_version"] = PACK_VERSION
            f.attrs["names"] = json.dumps(names)
            f.attrs["ignore_value"] = json.dumps(getattr(dataset, "ignore_value", None))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for key, shp in (("A", (n, *shape)), ("B", (n, *shape)), ("label", (n, *shape[1:]))):
                f.create_dataset(key, shape=shp, dtype=np.uint8, chunks=(1, *shp[1:]), fletcher32=True)
            for i in range(n):
                t1, t2, label = first if i == 0 else dataset[i]
                if t1.shape != shape:
                    raise DatasetError(f"pack_dataset: sample {names[i]} has size {t1.shape}, the first has {shape}")
                f["A"][i] = np.round(np.clip(t1, 0, 1) * 255).astype(np.uint8)
                f["B"][i] = np.round(np.clip(t2, 0, 1) * 255).astype(np.uint8)
                f["label"][i] = label
        with open(tmp, "r+b") as f:
            f.write(_PACK_SEAL + _file_digest(tmp).encode() + b"\n")
    return Path(path)


def _file_digest(path, start=_USERBLOCK, block=1 << 22) -> str:
    """SHA-256 of a file from byte ``start`` on, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _check_pack_file(path: Path):
    """Refuse a damaged v2 pack before HDF5 parses it; v1 packs (HDF5 from byte 0) pass unchecked."""
    with open(path, "rb") as f:
        head = f.read(len(_PACK_SEAL) + 65)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return 1
    if not head.startswith(_PACK_SEAL) or head[-1:] != b"\n":
        raise DatasetError(f"{path}: not a hicd dataset pack (no hicd header; damaged, truncated or foreign?)")
    if _file_digest(path).encode() != head[len(_PACK_SEAL):-1]:
        raise DatasetError(f"{path}: damaged dataset pack (SHA-256 of the file does not match its header)")
    return 2


def _reserve(path, data_bytes, *, chunks):
    """Reserve the disk space a pack will take before HDF5 writes it (``posix_fallocate``).

    HDF5 does not survive a full disk (a write error inside its cache ends in a crash of
    the interpreter at exit), so a pack that cannot fit must fail here, as an ordinary
    ``OSError``, before the HDF5 library writes anything. The reservation is the raw
    bytes plus 1 KiB per chunk (chunk index, Fletcher32) plus 64 KiB of metadata, several
    times what HDF5 adds (100-300 bytes per chunk and about 8 KiB measured); HDF5 truncates
    the file to its real size on close. Where the file
    system cannot reserve space (no ``posix_fallocate``), nothing is reserved.
    """
    size = int(data_bytes) + 1024 * int(chunks) + (1 << 16)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    return
                raise OSError(exc.errno, f"{exc.strerror} (reserving {size} bytes for the pack {path})") from None
    finally:
        os.close(fd)


class H5Dataset:
    """A dataset packed by ``pack_dataset``; ``len`` and ``[i] -> (t1, t2, label)``.

    Damage (truncation, bad chunks, a foreign file) raises ``DatasetError`` naming
    the file and the key. A version 2 pack's SHA-256 is checked when it is opened
    (``verify=True``; about a second per GB), before HDF5 reads any byte of it.
    """

    def __init__(self, path, *, verify=True):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: no such dataset file")
        if verify:
            _check_pack_file(self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DatasetError(f"{self.path}: not a readable HDF5 dataset (truncated or damaged?): {exc}") from None
        f = self._file
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != PACK_FORMAT:
            raise DatasetError(f"{self.path}: not a hicd dataset pack (format {fmt!r})")
        for key in ("A", "B", "label"):
            if key not in f:
                raise DatasetError(f"{self.path}: missing key {key!r}")
        self.names = json.loads(f.attrs["names"])
        self.ignore_value = json.loads(f.attrs.get("ignore_value", "null"))
        self._n = f["A"].shape[0]
        if f["B"].shape != f["A"].shape or f["label"].shape != (self._n, *f["A"].shape[2:]):
            raise DatasetError(f"{self.path}: inconsistent shapes A {f['A'].shape}, B {f['B'].shape}, label {f['label'].shape}")

    def __len__(self):
        return self._n

    def _read(self, key, i):
        try:
            return self._file[key][i]
        except (OSError, ValueError, RuntimeError) as exc:
            raise DatasetError(f"{self.path}: sample {i} of {key!r} is damaged ({exc})") from None

    def __getitem__(self, i):
        if not -self._n <= i < self._n:
            raise IndexError(f"{self.path}: index {i} out of range for {self._n} samples")
        scale = np.float32(1.0 / 255.0)
        return (self._read("A", i).astype(np.float32) * scale, self._read("B", i).astype(np.float32) * scale,
                self._read("label", i))

    def close(self):
        self._file.close()


def open_dataset(path, split=None, *, ignore_value=None, label_threshold=None, bands=None):
    """A ``FolderDataset`` for a folder, an ``H5Dataset`` for a ``.h5``/``.hdf5`` file."""
    path = Path(path)
    if path.is_file():
        if bands is not None:
            raise DatasetError(f"{path}: band selection applies to image folders; an HDF5 pack holds the "
                               "bands it was packed with")
        return H5Dataset(path)
    if path.is_dir():
        return FolderDataset(path, split, ignore_value=ignore_value, label_threshold=label_threshold, bands=bands)
    raise DatasetError(f"{path}: no such dataset folder or file")


def random_crop_flip(t1, t2, label, rng, crop: int | None = None, *, flips=True, change_rate=0.0):
    """A random ``crop x crop`` window and a random synchronised flip / 90-degree rotation.

    The same geometric transform is applied to ``t1 (3, H, W)``, ``t2 (3, H, W)``
    and ``label (H, W)``; one of the 8 symmetries of the square when ``flips``.

    ``change_rate`` (change-aware sampling): with this probability the window is
    drawn among those that contain a change pixel (a change pixel uniformly at
    random, then a window position uniformly among those holding it); otherwise,
    and always for a sample without change, uniformly over the image. At 0 no
    extra random number is drawn, so the stream equals plain uniform crops.
    """
    H, W = label.shape
    if crop is not None:
        if crop > H or crop > W:
            raise ValueError(f"crop {crop} larger than the image {H}x{W}")
        y = x = None
        if change_rate > 0.0 and rng.random() < change_rate:
            changed = np.flatnonzero(label == 1)
            if changed.size:
                cy, cx = divmod(int(changed[rng.integers(changed.size)]), W)
                y = int(rng.integers(max(0, cy - crop + 1), min(cy, H - crop) + 1))
                x = int(rng.integers(max(0, cx - crop + 1), min(cx, W - crop) + 1))
        if y is None:
            y = int(rng.integers(0, H - crop + 1))
            x = int(rng.integers(0, W - crop + 1))
        t1, t2, label = t1[:, y : y + crop, x : x + crop], t2[:, y : y + crop, x : x + crop], label[y : y + crop, x : x + crop]
    if flips:
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        t1, t2 = np.rot90(t1, k, axes=(1, 2)), np.rot90(t2, k, axes=(1, 2))
        label = np.rot90(label, k)
        if flip:
            t1, t2, label = t1[:, :, ::-1], t2[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(t1), np.ascontiguousarray(t2), np.ascontiguousarray(label)


def random_colour(image, rng, strength):
    """``image (C, H, W)`` with a random gain and offset per channel: ``x g_c + o_c``.

    ``g_c`` is uniform in ``[1 - strength, 1 + strength]`` and ``o_c`` in ``[-strength / 2,
    strength / 2]`` (images in [0, 1]; the result is not clipped). Applied to t1 and t2 with
    draws of their own, it imitates the illumination, season and sensor differences between
    two dates that a change detector must not call change. ``strength`` 0 returns the image
    and draws nothing, so the random stream is that of no colour augmentation.
    """
    if strength == 0.0:
        return image
    C = image.shape[0]
    gain = rng.uniform(1.0 - strength, 1.0 + strength, size=(C, 1, 1))
    offset = rng.uniform(-strength / 2, strength / 2, size=(C, 1, 1))
    return (image * gain + offset).astype(image.dtype, copy=False)


class InMemory:
    """A dataset whose samples are read once and then served from memory (small sets of large scenes)."""

    def validate(self, progress=False):  # every sample was read (and so checked) when this was built
        return len(self)

    def __init__(self, dataset):
        self.dataset = dataset
        self.names = list(getattr(dataset, "names", [f"{i:06d}" for i in range(len(dataset))]))
        self.ignore_value = getattr(dataset, "ignore_value", None)
        self._samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, i):
        return self._samples[i]


def channel_stats(dataset, *, max_samples=None):
    """Per-channel mean and standard deviation of the images of a dataset (both dates), float lists.

    Every pixel of ``t1`` and ``t2`` of the first ``max_samples`` samples (all by
    default) counts once; accumulated in float64. A channel whose standard
    deviation is below 1e-6 (a constant band) gets 1.0, so that it is only shifted.
    """
    n = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    if n == 0:
        raise DatasetError("channel_stats: the dataset is empty")
    total = total_sq = None
    count = 0
    for i in range(n):
        t1, t2, _ = dataset[i]
        for img in (t1, t2):
            flat = np.asarray(img, np.float64).reshape(img.shape[0], -1)
            s, sq = flat.sum(axis=1), np.square(flat).sum(axis=1)
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return [float(v) for v in mean], [float(v) for v in std]


def change_fraction(dataset, *, ignore_value=None):
    """The share of change pixels over a dataset's labels (pixels equal to ``ignore_value`` left out), a float.

    ``DatasetError`` when no pixel is labelled change: no class weight can be taken from it.
    """
    change = labelled = 0
    for i in range(len(dataset)):
        label = np.asarray(dataset[i][2])
        valid = label != ignore_value if ignore_value is not None else np.ones(label.shape, bool)
        change += int(np.count_nonzero((label == 1) & valid))
        labelled += int(np.count_nonzero(valid))
    if change == 0:
        raise DatasetError("change_fraction: no training label has a change pixel (no class weight can be derived)")
    return change / labelled


# --------------------------------------------------------------------------- writing images


def to_uint8(img) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3); float/bool (H, W) -> uint8 (H, W)."""
    img = np.asarray(img)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    scaled = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return scaled.transpose(1, 2, 0) if scaled.ndim == 3 else scaled


def write_png(array, path) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    Image = _pil()
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(array)).save(tmp, format="PNG")
    return Path(path)


def change_overlay(t2, change, colour=(255, 0, 0), alpha=0.5) -> np.ndarray:
    """``t2 (3, H, W)`` as uint8 RGB with the ``change (H, W)`` pixels tinted by ``colour``."""
    rgb = to_uint8(t2).astype(np.float32)
    change = np.asarray(change, bool)
    rgb[change] = (1 - alpha) * rgb[change] + alpha * np.asarray(colour, np.float32)
    return np.round(rgb).astype(np.uint8)


def write_dataset_folder(dataset, out) -> Path:
    """Write a dataset as a LEVIR-CD style folder (A/, B/, label/; labels 0/255).

    RGB images become 8-bit PNGs; images with another band count become float32 GeoTIFFs
    (their values exactly, read back as stored; needs rasterio), with PNG labels.
    """
    out = Path(out)
    names = getattr(dataset, "names", None) or [f"{i:06d}" for i in range(len(dataset))]
    for i in range(len(dataset)):
        t1, t2, label = dataset[i]
        for sub, image in (("A", t1), ("B", t2)):
            if image.shape[0] == 3:
                write_png(to_uint8(image), out / sub / f"{names[i]}.png")
            else:
                from .raster import write_raster

                write_raster(out / sub / f"{names[i]}.tif", np.asarray(image, dtype=np.float32))
        label = np.asarray(label)
        write_png(np.where(label == 1, 255, label).astype(np.uint8) if label.max() <= 1 else label,
                  out / "label" / f"{names[i]}.png")
    return out


def image_grid(rows, gap=3, background=255) -> np.ndarray:
    """Lay out rows of uint8 (h, w, 3) tiles (equal sizes) with ``gap`` pixels between them."""
    def join(tiles, axis):
        pad_shape = list(tiles[0].shape)
        pad_shape[axis] = gap
        pad = np.full(pad_shape, background, np.uint8)
        out = [tiles[0]]
        for tile in tiles[1:]:
            out += [pad, tile]
        return np.concatenate(out, axis=axis)

    return join([join(list(r), axis=1) for r in rows], axis=0)
