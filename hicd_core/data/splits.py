"""Train / validation / test splits of the built-in synthetic data or of a real dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .folder import ArrayDataset, FolderDataset, open_dataset, validate_dataset
from .synthetic import synthetic_pairs

__all__ = ["load_splits", "Subset", "Repeat"]


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
                ignore_value=None, label_threshold=None):
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
        return tuple(FolderDataset(path, s, ignore_value=ignore_value, label_threshold=label_threshold)
                     for s in ("train", "val", "test"))
    full = open_dataset(path, ignore_value=ignore_value, label_threshold=label_threshold)
    n = len(full)
    if n < 3:
        raise DatasetError(f"{path}: {n} samples are too few to split into train, validation and test")
    order = np.random.default_rng(seed).permutation(n)
    n_tr = max(1, int(round(fractions[0] * n)))
    n_va = max(1, int(round(fractions[1] * n)))
    n_tr = min(n_tr, n - n_va - 1)
    return (Subset(full, order[:n_tr]), Subset(full, order[n_tr : n_tr + n_va]), Subset(full, order[n_tr + n_va :]))

