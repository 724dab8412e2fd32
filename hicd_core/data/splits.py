"""Train / validation / test splits of the built-in synthetic data or of a real dataset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .folder import ArrayDataset, FolderDataset, open_dataset, validate_dataset
from .synthetic import synthetic_pairs

__all__ = ["load_splits", "Subset", "Repeat", "split_scenes", "write_split_lists"]


class Subset:
    """Samples ``indices`` of a dataset."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        names = getattr(dataset, "names", None)
        self.names = [names[i] for i in self.indices] if names is not None else [str(i) for i in self.indices]
        self.ignore_value = getattr(dataset, "ignore_value", None)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def validate(self, progress=False):
        """Check the samples this subset shows (only those, for a folder)."""
        if isinstance(self.dataset, FolderDataset):
            return self.dataset.validate(self.indices, progress=progress)
        return validate_dataset(self.dataset, progress=progress)


class Repeat:
    """A dataset seen ``times`` times per epoch (small sets of large tiles with random crops)."""

    def __init__(self, dataset, times: int):
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self.dataset, self.times = dataset, int(times)
        self.ignore_value = getattr(dataset, "ignore_value", None)

    def __len__(self):
        return len(self.dataset) * self.times

    def __getitem__(self, i):
        return self.dataset[i % len(self.dataset)]


def load_splits(data=None, *, size=64, n_train=400, n_val=64, n_test=128, seed=0, fractions=(0.7, 0.1, 0.2),
                ignore_value=None, label_threshold=None, bands=None):
    """``(train, val, test)`` datasets.

    ``data=None``: the built-in synthetic scenes, three disjoint scene seeds
    (``seed``, ``seed + 1000``, ``seed + 2000``), ``size`` x ``size`` pixels.
    A folder: ``list/train.txt``, ``list/val.txt``, ``list/test.txt`` when all three
    exist, otherwise a deterministic shuffle (``seed``) of its files split by
    ``fractions``. An HDF5 pack: the same shuffle split of its samples.
    """
    if data is None:
        return tuple(ArrayDataset(*synthetic_pairs(n, size, seed + 1000 * k)) for k, n in enumerate((n_train, n_val, n_test)))
    path = Path(data)
    if path.is_dir() and all((path / "list" / f"{s}.txt").is_file() for s in ("train", "val", "test")):
        return tuple(FolderDataset(path, s, ignore_value=ignore_value, label_threshold=label_threshold, bands=bands)
                     for s in ("train", "val", "test"))
    full = open_dataset(path, ignore_value=ignore_value, label_threshold=label_threshold, bands=bands)
    n = len(full)
    if n < 3:
        raise DatasetError(f"{path}: {n} samples are too few to split into train, validation and test")
    order = np.random.default_rng(seed).permutation(n)
    n_tr = max(1, int(round(fractions[0] * n)))
    n_va = max(1, int(round(fractions[1] * n)))
    n_tr = min(n_tr, n - n_va - 1)
    return (Subset(full, order[:n_tr]), Subset(full, order[n_tr : n_tr + n_va]), Subset(full, order[n_tr + n_va :]))



def split_scenes(names, *, seed=0, fractions=(0.7, 0.1, 0.2), scene_pattern=None):
    r"""A seeded split of sample names into ``{"train", "val", "test"}`` lists, by scene.

    ``scene_pattern``: a regular expression whose first group (or whole match) names the
    scene of a sample (e.g. ``r"^(\w+?_\d+)_"`` for tiles ``test_2_0000_0512`` of scene
    ``test_2``); tiles of one scene always land in one split. Without it every sample is
    its own scene. Scenes are shuffled by ``seed``; validation and test get
    ``round(fraction * scenes)`` scenes each (at least one), training the rest (at least one).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    regex = re.compile(scene_pattern) if scene_pattern else None
    scenes = {}
    for name in names:
        key = name
        if regex is not None:
            match = regex.search(name)
            if match is None:
                raise DatasetError(f"sample {name!r} does not match the scene pattern {scene_pattern!r}")
            key = match.group(1) if match.groups() else match.group(0)
        scenes.setdefault(key, []).append(name)
    keys = sorted(scenes)
    if len(keys) < 3:
        raise DatasetError(f"{len(keys)} scenes are too few to split into training, validation and test")
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n_test = min(max(1, round(fractions[2] * len(keys))), len(keys) - 2)
    n_val = min(max(1, round(fractions[1] * len(keys))), len(keys) - n_test - 1)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {part: sorted(n for key in part_keys for n in scenes[key]) for part, part_keys in parts.items()}


def write_split_lists(lists, folder, *, overwrite=False):
    """Write ``{"train", "val", "test"}`` name lists as ``folder/list/<part>.txt`` (atomically); returns the paths."""
    from ..io import atomic_path

    folder = Path(folder)
    paths = {part: folder / "list" / f"{part}.txt" for part in ("train", "val", "test")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise DatasetError(f"{existing[0]} exists; remove the old lists or overwrite them on purpose")
    for part, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.write_text("".join(name + "\n" for name in lists[part]))
    return paths
