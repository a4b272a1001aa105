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
replaces it atomically (temporary file, fsync, rename, fsync of the directory; one PUT
on object stores), so a reader sees the old state or the new one, never half of one.
``directory`` may be a local path or an object store URL (``s3://bucket/run``): every
file operation goes through `dcheckpoint._storage`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from ._metadata import METADATA_FILE
from ._storage import TMP_MARKER, is_url, open_storage
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
    "check_inside",
    "get_pending_deletion",
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
    """Whether ``path`` (a directory or object store prefix) is a committed checkpoint."""
    return open_storage(path).exists(METADATA_FILE)


def delete_checkpoint(path: str | os.PathLike, marker: str = METADATA_FILE) -> bool:
    """Deletes one checkpoint (coordinator only); returns whether it existed.

    The commit marker (the metadata file; an export's manifest) goes first (and,
    locally, the directory is fsynced), so a deletion cut short leaves something that
    no reader takes for a committed checkpoint; on object stores this is what makes
    deletion safe at all, as the remaining objects are deleted one by one.

    A local ``path`` that is a symbolic link is unlinked as a link: its target (another
    project's checkpoint, say) is never touched. Nothing inside is followed either.
    """
    if not isinstance(marker, str) or marker in ("", ".", "..") or "/" in marker \
            or os.sep in marker:
        raise ValueError(f"Commit marker {marker!r} must be one file name")
    storage = open_storage(path)
    if getattr(storage, "is_link", lambda: False)():
        parent = open_storage(os.path.dirname(storage.path))
        return parent.remove(os.path.basename(storage.path))
    if not storage.exists():
        return False
    storage.remove(marker)
    storage.remove_tree()
    return True


def remove_leftover_temporaries(
    directory: str | os.PathLike, checkpoint_name: str | None = None
) -> list[str]:
    """Removes what crashed saves left in ``directory`` (coordinator only).

    Locally those are the ``*.tmp-*`` entries. On object stores a save writes into its
    final prefix, so a crashed one leaves ``<checkpoint_name>-<N>/`` without a metadata
    file; with ``checkpoint_name`` given those are removed too. Call only when no save
    into ``directory`` is in flight (when a manager starts).

    Returns:
      The removed paths, sorted.
    """
    storage = open_storage(directory)
    crashed_save = None
    if checkpoint_name and not storage.renames_atomically:
        crashed_save = re.compile(rf"{re.escape(checkpoint_name)}-\d+")

    def is_leftover(name: str) -> bool:
        if TMP_MARKER in name:
            return True
        return bool(crashed_save and crashed_save.fullmatch(name)
                    and not is_committed(storage.join(name)))

    return [storage.join(name) for name in storage.list_dir()
            if is_leftover(name) and storage.remove(name)]


def _relative(directory: str, path: str) -> str:
    """The stored form of ``path``; refuses a path outside ``directory``."""
    if is_url(directory):
        base = directory.rstrip("/") + "/"
        relative = path[len(base):] if path.startswith(base) else path
    else:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
    _check_relative(directory, relative)
    return relative


def _check_relative(directory: str, relative: object) -> str:
    """``relative`` if it is one plain path component (what a manager writes)."""
    if (
        not isinstance(relative, str)
        or not relative
        or relative in (os.curdir, os.pardir)
        or any(c in relative for c in ("/", "\\", "\0", os.sep))
    ):
        raise CorruptCheckpointError(
            f"State file of {directory!r}: checkpoint path {relative!r} is not a plain path "
            f"inside the directory (one name, no '/', '.' or '..')"
        )
    return relative


def check_inside(directory: str | os.PathLike, path: str) -> str:
    """``path`` (an entry of ``directory``), refusing a link that leads outside it.

    A state-file entry that is a symbolic link to another project's checkpoint must
    not be read (or deleted) as if it were this directory's. Object stores have no
    links.

    Raises:
      CorruptCheckpointError: ``path`` resolves outside ``directory``.
    """
    if is_url(path) or not os.path.islink(path):
        return path
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if not real.startswith(root + os.sep):
        raise CorruptCheckpointError(
            f"Checkpoint {path!r} is a symbolic link to {real!r}, outside the managed "
            f"directory {root!r}; refusing to follow it"
        )
    return path


def write_checkpoint_state(
    directory: str | os.PathLike, state: CheckpointState, *, pending_deletion=()
) -> None:
    """Replaces ``directory``'s state file atomically (coordinator only).

    Args:
      directory: the managed directory; must exist.
      state: paths absolute or relative to the working directory, all inside
        ``directory``.
      pending_deletion: checkpoints the writer deletes right after this write. They are
        recorded apart from the managed ones (readers never take them for checkpoints),
        so a manager killed before it deleted them lets the next one finish the job.

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
    if pending_deletion:
        document["pending_deletion"] = [_relative(directory, p) for p in pending_deletion]
    data = (json.dumps(document, indent=2) + "\n").encode()
    # Locally: temporary file (its name carries the tmp marker, so a crash leaves
    # something the next manager's cleanup removes), fsync, rename, fsync the directory.
    # On object stores: one PUT, which readers see whole or not at all.
    open_storage(directory).write_bytes_atomic(STATE_FILENAME, data)


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
    storage = open_storage(directory)
    path = storage.join(STATE_FILENAME)
    try:
        data = storage.read_bytes(STATE_FILENAME, max_bytes=_MAX_STATE_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        document = json.loads(data)
        return _parse(directory, document)
    except (ValueError, TypeError, KeyError) as error:
        if isinstance(error, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(
            f"State file {path!r} is not a {_FORMAT} version {_VERSION} JSON document: "
            f"{error}"
        ) from error


def get_pending_deletion(directory: str | os.PathLike) -> list[str]:
    """Checkpoints the last manager was about to delete when it wrote the state file.

    Raises:
      CorruptCheckpointError: the state file is malformed.
    """
    directory = os.fspath(directory)
    storage = open_storage(directory)
    try:
        document = json.loads(storage.read_bytes(STATE_FILENAME, max_bytes=_MAX_STATE_BYTES))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except ValueError as error:
        raise CorruptCheckpointError(f"State file of {directory!r}: {error}") from None
    pending = document.get("pending_deletion", []) if isinstance(document, dict) else []
    if not isinstance(pending, list):
        raise CorruptCheckpointError(
            f"State file of {directory!r}: pending_deletion must be a list, found "
            f"{type(pending).__name__}")
    return [os.path.join(directory, _check_relative(directory, p)) for p in pending]


def _parse(directory: str, document: object) -> CheckpointState:
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, found {type(document).__name__}")
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
      CorruptCheckpointError: the state file is malformed or points outside ``directory``
        (by its text, or through a symbolic link).
    """
    state = get_checkpoint_state(directory)
    if state is None:
        return None
    path = check_inside(directory, state.model_checkpoint_path)
    return path if is_committed(path) else None
