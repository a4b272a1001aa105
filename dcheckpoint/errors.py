"""One error hierarchy, so callers can catch "a checkpoint problem" in one clause.

Each error also subclasses the built-in that users already catch for that kind of
problem (a missing checkpoint is a ``FileNotFoundError``, a mismatch a ``ValueError``).
Messages name the array or path, what was expected and what was found.
"""

from __future__ import annotations

__all__ = [
    "StaleStateWarning",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "CoordinationError",
    "CoordinationTimeoutError",
    "CheckpointLockedError",
    "StorageTimeoutError",
]


class CheckpointError(Exception):
    """Root of every error this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint (or array inside one) exists at the given path."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint and the restore target disagree on shape, dtype or structure."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """Stored bytes or metadata fail a checksum or the format's rules."""


class CoordinationError(CheckpointError, RuntimeError):
    """Another process of the job failed; every process raises this same error."""


class CoordinationTimeoutError(CoordinationError, TimeoutError):
    """A collective step did not complete in time (a peer crashed or hangs)."""


class CheckpointLockedError(CheckpointError, RuntimeError):
    """Another live writer holds the checkpoint directory."""


class StorageTimeoutError(CheckpointError, TimeoutError):
    """Storage (an object store, a network filesystem) did not answer in time."""


class StaleStateWarning(UserWarning):
    """A ``Checkpoint`` saved an immutable attribute that has not changed since its last
    save: usually ``state = state.replace(...)`` rebound a name, and the checkpoint still
    holds the old object (assign the new one: ``ckpt.state = state``)."""
