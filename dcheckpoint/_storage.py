"""Where a checkpoint's bytes live, and how a save becomes visible atomically.

The engine talks to storage through `Storage` only. Chunk data always goes through
TensorStore (``kvstore_spec``); the few small files the commit protocol needs (metadata,
state file) go through the methods here.

Commit rule (see docs/FORMAT.md): a checkpoint exists iff its metadata file exists.
On a local filesystem the save is also staged in a sibling ``<prefix>.tmp-<id>/``
directory and renamed into place after the metadata is fsynced, so a crashed save
never even occupies the final name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid

from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["LocalStorage", "open_storage", "TMP_MARKER"]

TMP_MARKER = ".tmp-"


def open_storage(path: str) -> LocalStorage:
    """Returns the storage for a checkpoint path (a local directory for now)."""
    if "://" in str(path):
        raise ValueError(f"Unsupported checkpoint location {path!r}: expected a local path")
    return LocalStorage(os.fspath(path))


class LocalStorage:
    """A checkpoint directory on a local (or POSIX shared) filesystem."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __repr__(self):
        return f"LocalStorage({self.path!r})"

    def kvstore_spec(self, relpath: str = "") -> dict:
        """TensorStore kvstore spec of a sub-directory (trailing slash: a directory)."""
        return {"driver": "file", "path": os.path.join(self.path, relpath, "")}

    def exists(self, relpath: str = "") -> bool:
        return os.path.exists(os.path.join(self.path, relpath))

    def read_bytes(self, relpath: str, *, max_bytes: int) -> bytes:
        """Reads a small file; refuses one larger than ``max_bytes`` (untrusted input)."""
        full = self.resolve_inside(relpath)
        with open(full, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise CorruptCheckpointError(f"{full}: larger than the {max_bytes}-byte limit")
        return data

    def write_bytes_atomic(self, relpath: str, data: bytes) -> None:
        """Writes a file so that readers see the old content or the new, never a mix."""
        full = os.path.join(self.path, relpath)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tmp = f"{full}{TMP_MARKER}{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, full)
        except BaseException:
            # Leave no half-written temp file behind to confuse a later reader.
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(os.path.dirname(full))

    def resolve_inside(self, relpath: str) -> str:
        """Absolute path of ``relpath``, refusing symlinks that lead outside."""
        full = os.path.join(self.path, relpath)
        root = os.path.realpath(self.path)
        real = os.path.realpath(full)
        if real != root and not real.startswith(root + os.sep):
            raise CorruptCheckpointError(
                f"{full} resolves to {real}, outside the checkpoint directory {root}"
            )
        return full

    def remove_tree(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- staging and commit (coordinator only) --------------------------------------

    def staging(self, save_id: str) -> LocalStorage:
        """The sibling directory a save writes into before it is renamed into place."""
        return LocalStorage(f"{self.path}{TMP_MARKER}{save_id}")

    def publish(self, staged: LocalStorage) -> None:
        """Moves a fully written and fsynced staging directory to this path.

        An existing checkpoint at this path is swapped out atomically (renameat2
        RENAME_EXCHANGE), so a crash leaves either the old or the new one in place.
        """
        parent = os.path.dirname(self.path)
        if os.path.exists(self.path):
            _exchange(staged.path, self.path)
            shutil.rmtree(staged.path)  # now holds the replaced checkpoint
        else:
            os.rename(staged.path, self.path)
        fsync_dir(parent)


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsyncs every directory under ``path`` (TensorStore fsyncs the files it writes)."""
    for dirpath, _, _ in os.walk(path):
        fsync_dir(dirpath)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise CheckpointError(
            f"Cannot replace {b} atomically: this C library has no renameat2; "
            "write to a new path instead"
        )
    rc = libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


