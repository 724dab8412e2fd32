"""The library's error types: one place, so callers can catch them by kind."""

from __future__ import annotations

__all__ = ["HicdError", "NonFiniteError", "CheckpointError", "DatasetError", "RunLockError"]


class HicdError(Exception):
    """Base class of every error that hicd raises on purpose."""


class NonFiniteError(HicdError, FloatingPointError):
    """A loss, gradient or weight came out NaN or infinite; the message names which."""


class CheckpointError(HicdError):
    """A checkpoint file is missing, damaged, foreign or of the wrong schema; the message names the file and key."""


class DatasetError(HicdError, ValueError):
    """A dataset folder or file is unusable; the message names the file at fault."""


class RunLockError(HicdError):
    """Another live process is writing into the same run folder; the message names it."""
