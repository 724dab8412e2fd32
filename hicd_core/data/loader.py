"""Host-side batching: ordered evaluation batches and seeded random training batches."""

from __future__ import annotations

import numpy as np

from .degradations import degrade
from .folder import random_crop_flip

__all__ = ["iterate_batches", "TrainBatches"]


def _stack(samples):
    return tuple(np.stack([s[k] for s in samples]) for k in range(3))


def iterate_batches(dataset, batch_size, indices=None):
    """Host batches ``(t1 (B, 3, H, W), t2, label (B, H, W))`` of a dataset, in order."""
    indices = list(range(len(dataset)) if indices is None else indices)
    for start in range(0, len(indices), batch_size):
        yield _stack([dataset[i] for i in indices[start : start + batch_size]])


class TrainBatches:
    """Random training batches drawn from one seeded generator.

    Each epoch shuffles the dataset and yields ``len(dataset) // batch_size``
    full batches ``(x1, x2_hq, x2_lq, label)`` (``x2_lq`` is None without a
    ``setting``): every sample gets a random crop (when ``crop``) and a random
    flip / 90-degree rotation shared by the pair and the label (when
    ``augment``), and, for students, a freshly degraded t2 whose degradation
    seed is drawn from the same generator. The generator's state is therefore all
    a checkpoint needs to replay the data exactly.
    """

    def __init__(self, dataset, batch_size, *, rng, crop=None, setting=None, augment=True):
        if len(dataset) < batch_size:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than one batch of {batch_size}")
        self.dataset, self.batch_size, self.rng = dataset, batch_size, rng
        self.crop, self.setting, self.augment = crop, setting, augment

    def __len__(self):
        return len(self.dataset) // self.batch_size

    def epoch(self):
        order = self.rng.permutation(len(self.dataset))
        for b in range(len(self)):
            x1s, hqs, lqs, labels = [], [], [], []
            for i in order[b * self.batch_size : (b + 1) * self.batch_size]:
                t1, t2, label = self.dataset[int(i)]
                if self.crop is not None or self.augment:
                    t1, t2, label = random_crop_flip(t1, t2, label, self.rng, self.crop, flips=self.augment)
                x1s.append(t1)
                hqs.append(t2)
                labels.append(label)
                if self.setting is not None:
                    lqs.append(degrade(t2, self.setting, int(self.rng.integers(2**63))))
            yield (np.stack(x1s), np.stack(hqs), np.stack(lqs) if lqs else None, np.stack(labels))
