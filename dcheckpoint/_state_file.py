"""The directory's state file (``checkpoint``), as TensorFlow's ``CheckpointState``.

A managed directory holds one small, human-readable JSON file named ``checkpoint``:
the latest checkpoint, every checkpoint the manager still manages (oldest first), their
save times and the time of the last checkpoint kept by ``keep_checkpoint_every_n_hours``.
It is what lets a new :class:`~dcheckpoint.CheckpointManager` (a new process, a restarted
job) continue where the last one stopped, and what evaluators poll with
:func:`latest_checkpoint`.

Paths are stored relative to the directory, so a directory can be moved or mounted
elsewhere; a stored path that would leave the directory is refused on read, because the
file may come from somewhere untrusted. Only the coordinator writes the file, and it
replaces it atomically (temporary file, fsync, rename, fsync of the directory), so a
reader sees the old state or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

from ._metadata import METADATA_FILE
from ._storage import TMP_MARKER, fsync_dir
from .errors import CorruptCheckpointError

__all__ = [
    "STATE_FILENAME",
    "CheckpointState",
    "get_checkpoint_state",
    "latest_checkpoint",
    "write_checkpoint_state",
    "is_committed",
    "delete_checkpoint",
    "remove_leftover_temporaries",
]

STATE_FILENAME = "checkpoint"
_FORMAT = "dcheckpoint.CheckpointState"
_VERSION = 1
_MAX_STATE_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointState:
    """What the state file says, with paths joined to the directory (TF's proto fields).

    Attributes:
      model_checkpoint_path: the latest checkpoint's path.
      all_model_checkpoint_paths: the managed checkpoints' paths, oldest first (the
        latest is the last one).
      all_model_checkpoint_timestamps: save time of each, seconds since the epoch.
      last_preserved_timestamp: save time of the last checkpoint kept for good by
        ``keep_checkpoint_every_n_hours`` (or when the manager started).
    """

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


def is_committed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a committed checkpoint (its metadata file exists)."""
    return os.path.isfile(os.path.join(path, METADATA_FILE))


def delete_checkpoint(path: str | os.PathLike) -> bool:
    """Deletes one checkpoint directory (coordinator only); returns whether it existed.

    The metadata file goes first and the directory is fsynced, so a deletion cut short
    leaves a directory that no reader takes for a committed checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    try:
        os.remove(os.path.join(path, METADATA_FILE))
        fsync_dir(path)
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    return True


def remove_leftover_temporaries(directory: str | os.PathLike) -> list[str]:
    """Removes ``*.tmp-*`` entries of crashed saves from ``directory`` (coordinator only).

    Call only when no save into ``directory`` is in flight (when a manager starts).

    Returns:
      The removed paths, sorted.
    """
    directory = os.fspath(directory)
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return removed
    for name in names:
        if TMP_MARKER not in name:
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
        removed.append(path)
    return removed


def _relative(directory: str, path: str) -> str:
    """The stored form of ``path``; refuses a path outside ``directory``."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
    _check_relative(directory, relative)
    return relative


def _check_relative(directory: str, relative: object) -> str:
    if (
        not isinstance(relative, str)
        or not relative
        or os.path.isabs(relative)
        or os.path.normpath(relative) != relative
        or relative.split(os.sep)[0] in (os.curdir, os.pardir)
    ):
        raise CorruptCheckpointError(
            f"State file of {directory!r}: checkpoint path {relative!r} is not a plain path "
            f"inside the directory"
        )
    return relative


def write_checkpoint_state(directory: str | os.PathLike, state: CheckpointState) -> None:
    """Replaces ``directory``'s state file atomically (coordinator only).

    Args:
      directory: the managed directory; must exist.
      state: paths absolute or relative to the working directory, all inside
        ``directory``.

    Raises:
      CorruptCheckpointError: a path lies outside ``directory``.
    """
    directory = os.fspath(directory)
    document = {
        "format": _FORMAT,
        "version": _VERSION,
        "model_checkpoint_path": _relative(directory, state.model_checkpoint_path),
        "all_model_checkpoint_paths": [
            _relative(directory, p) for p in state.all_model_checkpoint_paths
        ],
        "all_model_checkpoint_timestamps": list(state.all_model_checkpoint_timestamps),
        "last_preserved_timestamp": state.last_preserved_timestamp,
    }
    data = (json.dumps(document, indent=2) + "\n").encode()
    # The temporary name carries the tmp marker, so a crash here leaves something the
    # next manager's cleanup removes.
    temporary = os.path.join(directory, f".{STATE_FILENAME}{TMP_MARKER}{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(directory, STATE_FILENAME))
    except BaseException:
        # Never leave a temporary behind on failure; the old state file stays valid.
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    fsync_dir(directory)


def get_checkpoint_state(directory: str | os.PathLike) -> CheckpointState | None:
    """Returns the state recorded in ``directory``'s ``checkpoint`` file.

    As TF's ``tf.train.get_checkpoint_state``: paths come back joined to ``directory``,
    and whether those checkpoints still exist is not checked.

    Returns:
      The state, or None when the directory has no state file.

    Raises:
      CorruptCheckpointError: the file is not a state file of this format, or a path
        in it would leave the directory.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, STATE_FILENAME)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_STATE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if len(data) > _MAX_STATE_BYTES:
            raise ValueError(f"larger than {_MAX_STATE_BYTES} bytes")
        document = json.loads(data)
        return _parse(directory, document)
    except (ValueError, TypeError, KeyError) as error:
        if isinstance(error, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(
            f"State file {path!r} is not a {_FORMAT} version {_VERSION} JSON document: "
            f"{error}"
        ) from error


def _parse(directory: str, document: dict) -> CheckpointState:
    if document.get("format") != _FORMAT or document.get("version") != _VERSION:
        raise ValueError(
            f"expected format {_FORMAT!r} version {_VERSION}, found "
            f"{document.get('format')!r} version {document.get('version')!r}"
        )
    paths = document["all_model_checkpoint_paths"]
    timestamps = document["all_model_checkpoint_timestamps"]
    if not isinstance(paths, list) or not isinstance(timestamps, list):
        raise ValueError("checkpoint paths and timestamps must be lists")
    if timestamps and len(timestamps) != len(paths):
        raise ValueError(f"{len(paths)} checkpoint paths but {len(timestamps)} timestamps")

    def join(relative):
        return os.path.join(directory, _check_relative(directory, relative))

    return CheckpointState(
        model_checkpoint_path=join(document["model_checkpoint_path"]),
        all_model_checkpoint_paths=tuple(join(p) for p in paths),
        all_model_checkpoint_timestamps=tuple(float(t) for t in timestamps),
        last_preserved_timestamp=float(document["last_preserved_timestamp"]),
    )


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """Returns the path of the latest committed checkpoint in ``directory``, or None.

    As TF's ``tf.train.latest_checkpoint``: None when there is no state file or when the
    checkpoint it names is not (or no longer) committed on disk.

    Raises:
      CorruptCheckpointError: the state file is malformed or points outside ``directory``.
    """
    state = get_checkpoint_state(directory)
    if state is None or not is_committed(state.model_checkpoint_path):
        return None
    return state.model_checkpoint_path
