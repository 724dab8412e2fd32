"""hicd: autodiff-free change detection across image quality by hierarchical correlation distillation.

Implements HiCD (Pang, Weng, Wu, Wang, Xia, IEEE TGRS 2024, arXiv 2401.10752)
with hand-derived gradients on any array-API backend (NumPy, CuPy,
array-api-strict). The core math:

>>> from hicd_core import self_correlation, hicd_loss
"""

from ._version import __version__
from .correlation import (
    cross_correlation,
    cross_correlation_backward,
    cross_correlation_forward,
    global_correlation,
    global_correlation_backward,
    global_correlation_forward,
    self_correlation,
    self_correlation_backward,
    self_correlation_forward,
)
from .distill import correlation_distance, feature_mse_loss, hicd_loss
from .errors import CheckpointError, DatasetError, HicdError, NonFiniteError, RunLockError


__all__ = [
    "__version__",
    "self_correlation",
    "self_correlation_forward",
    "self_correlation_backward",
    "cross_correlation",
    "cross_correlation_forward",
    "cross_correlation_backward",
    "global_correlation",
    "global_correlation_forward",
    "global_correlation_backward",
    "correlation_distance",
    "hicd_loss",
    "feature_mse_loss",
    "HicdError",
    "NonFiniteError",
    "CheckpointError",
    "DatasetError",
    "RunLockError",
]
