"""dcheckpoint: sharded, atomic, reshardable checkpoints for multi-host JAX jobs."""

from ._engine import read_metadata
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._options import CheckpointOptions
from ._pytree import restore_pytree, save_pytree
from .errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CoordinationError,
    CoordinationTimeoutError,
    CorruptCheckpointError,
)

__all__ = [
    "ArrayMetadata",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMetadata",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "CoordinationError",
    "CoordinationTimeoutError",
    "CorruptCheckpointError",
    "read_metadata",
    "restore_pytree",
    "save_pytree",
]
