"""Host-side data: synthetic scenes, quality degradations, dataset folders and packs.

Everything here runs on the host with NumPy and SciPy; batches move to the
training backend once, at the edge (``hicd_core.backend.from_host``).
"""

from .degradations import SETTINGS, degrade, degrade_with_params
from .folder import (
    ArrayDataset,
    DegradedView,
    FolderDataset,
    H5Dataset,
    InMemory,
    build_degraded_set,
    change_fraction,
    channel_stats,
    validate_dataset,
    open_dataset,
    pack_dataset,
    random_colour,
    random_crop_flip,
)
from .synthetic import synthetic_pair, synthetic_pairs

__all__ = [
    "synthetic_pair",
    "synthetic_pairs",
    "SETTINGS",
    "degrade",
    "degrade_with_params",
    "FolderDataset",
    "H5Dataset",
    "ArrayDataset",
    "DegradedView",
    "pack_dataset",
    "build_degraded_set",
    "open_dataset",
    "random_colour",
    "random_crop_flip",
    "InMemory",
    "channel_stats",
    "change_fraction",
    "validate_dataset",
]

from .loader import TrainBatches, iterate_batches  # noqa: E402
from .splits import Repeat, Subset, load_splits, split_scenes, write_split_lists  # noqa: E402

__all__ += ["TrainBatches", "iterate_batches", "Subset", "Repeat", "load_splits", "split_scenes", "write_split_lists"]
