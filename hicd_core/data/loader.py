"""Host-side batching: ordered evaluation batches and seeded random training batches."""

from __future__ import annotations

import numpy as np

from .degradations import degrade
from .folder import random_colour, random_crop_flip

__all__ = ["iterate_batches", "TrainBatches"]


def _stack(samples):
    return tuple(np.stack([s[k] for s in samples]) for k in range(3))


def iterate_batches(dataset, batch_size, indices=None):
    """Host batches ``(t1 (B, 3, H, W), t2, label (B, H, W))`` of a dataset, in order.

    A batch holds consecutive samples of one size: where the size changes (scenes
    of different sizes), the batch ends early and the next one starts.
    """
    indices = list(range(len(dataset)) if indices is None else indices)
    batch = []
    for i in indices:
        sample = dataset[i]
        if batch and (len(batch) == batch_size or sample[0].shape != batch[0][0].shape):
            yield _stack(batch)
            batch = []
        batch.append(sample)
    if batch:
        yield _stack(batch)


class TrainBatches:
    """Random training batches drawn from one seeded generator.

    Each epoch shuffles the dataset and yields ``len(dataset) // batch_size``
    full batches ``(x1, x2_hq, x2_lq, label)`` (``x2_lq`` is None without a
    ``setting``): every sample gets a random crop (when ``crop``) and a random
    flip / 90-degree rotation shared by the pair and the label (when
    ``augment``), and, for students, a freshly degraded t2 whose degradation
    seed is drawn from the same generator. ``change_rate``: the share of crops
    drawn around a change pixel (``random_crop_flip``); ``colour``: the strength of a random gain
    and offset per channel, drawn for t1 and t2 separately before t2 is degraded
    (``random_colour``; 0: off); ``pair_setting`` and ``pair_rate``: in that share of the crops, t1
    and t2 are both degraded by the named quality setting, each with its own seed, after the colour
    change and before a student's t2 is degraded again (an augmentation for teachers; 0: off, and
    nothing is drawn for it). The generator's state is therefore all a checkpoint needs to replay the
    data exactly.
    """

    def __init__(self, dataset, batch_size, *, rng, crop=None, setting=None, augment=True, change_rate=0.0,
                 colour=0.0, pair_setting=None, pair_rate=0.0):
        if len(dataset) < batch_size:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than one batch of {batch_size}")
        if not 0.0 <= change_rate <= 1.0:
            raise ValueError(f"change_rate must be in [0, 1], got {change_rate}")
        if not 0.0 <= colour < 1.0:
            raise ValueError(f"colour must be a strength in [0, 1), got {colour}")
        if not 0.0 <= pair_rate <= 1.0:
            raise ValueError(f"pair_rate must be in [0, 1], got {pair_rate}")
        if pair_rate > 0 and pair_setting is None:
            raise ValueError(f"pair_rate {pair_rate} needs a pair_setting (a quality setting) to degrade the pairs by")
        self.dataset, self.batch_size, self.rng = dataset, batch_size, rng
        self.crop, self.setting, self.augment, self.change_rate = crop, setting, augment, float(change_rate)
        self.colour = float(colour)
        self.pair_setting, self.pair_rate = pair_setting, float(pair_rate)

    def __len__(self):
        return len(self.dataset) // self.batch_size

    def epoch(self):
        order = self.rng.permutation(len(self.dataset))
        for b in range(len(self)):
            x1s, hqs, lqs, labels = [], [], [], []
            for i in order[b * self.batch_size : (b + 1) * self.batch_size]:
                t1, t2, label = self.dataset[int(i)]
                if self.crop is not None or self.augment:
                    t1, t2, label = random_crop_flip(t1, t2, label, self.rng, self.crop, flips=self.augment,
                                                     change_rate=self.change_rate if self.crop else 0.0)
                t1, t2 = random_colour(t1, self.rng, self.colour), random_colour(t2, self.rng, self.colour)
                if self.pair_rate > 0 and self.rng.random() < self.pair_rate:
                    t1 = degrade(t1, self.pair_setting, int(self.rng.integers(2**63)))
                    t2 = degrade(t2, self.pair_setting, int(self.rng.integers(2**63)))
                x1s.append(t1)
                hqs.append(t2)
                labels.append(label)
                if self.setting is not None:
                    lqs.append(degrade(t2, self.setting, int(self.rng.integers(2**63))))
            yield (np.stack(x1s), np.stack(hqs), np.stack(lqs) if lqs else None, np.stack(labels))
