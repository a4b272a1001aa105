"""dcheckpoint: sharded, atomic, reshardable checkpoints for multi-host JAX jobs."""

from ._checkpoint import Checkpoint
from ._dtensor import DTensorCheckpoint
from ._engine import read_metadata
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._options import CheckpointOptions
from ._pytree import restore_pytree, save_pytree
from ._status import CheckpointAssertionError, CheckpointLoadStatus, InitializationOnlyStatus
from ._tracking import AutoTrackable
from ._variable import Variable
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
    "AutoTrackable",
    "Checkpoint",
    "CheckpointAssertionError",
    "CheckpointLoadStatus",
    "DTensorCheckpoint",
    "InitializationOnlyStatus",
    "Variable",
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
