"""dcheckpoint: sharded, atomic, reshardable checkpoints for multi-host JAX jobs."""

from ._checkpoint import Checkpoint
from ._dtensor import DTensorCheckpoint
from ._engine import read_metadata
from ._exporting import ExportingCheckpointManager, LoadedSavedModel, load_savedmodel
from ._lock import DirectoryLock
from ._manager import CheckpointManager, checkpoints_iterator, wait_for_new_checkpoint
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._options import CheckpointOptions
from ._pytree import restore_pytree, save_pytree, target_from_metadata
from ._pytree_manager import PytreeManager
from ._state_file import CheckpointState, get_checkpoint_state, latest_checkpoint
from ._status import CheckpointAssertionError, CheckpointLoadStatus, InitializationOnlyStatus
from ._tracking import AutoTrackable
from ._variable import Variable
from ._verify import VerifyProblem, VerifyReport, verify
from .errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CoordinationError,
    CoordinationTimeoutError,
    CorruptCheckpointError,
    StaleStateWarning,
    StorageTimeoutError,
)

__all__ = [
    "ArrayMetadata",
    "AutoTrackable",
    "Checkpoint",
    "CheckpointAssertionError",
    "CheckpointLoadStatus",
    "CheckpointManager",
    "CheckpointState",
    "ExportingCheckpointManager",
    "LoadedSavedModel",
    "PytreeManager",
    "checkpoints_iterator",
    "get_checkpoint_state",
    "latest_checkpoint",
    "load_savedmodel",
    "wait_for_new_checkpoint",
    "DTensorCheckpoint",
    "InitializationOnlyStatus",
    "Variable",
    "DirectoryLock",
    "VerifyProblem",
    "VerifyReport",
    "verify",
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
    "target_from_metadata",
    "StaleStateWarning",
    "StorageTimeoutError",
]
