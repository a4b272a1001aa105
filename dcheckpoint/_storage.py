"""Where a checkpoint's bytes live, and how a save becomes visible atomically.

The engine, the state file and the manager talk to storage through the interface of
`LocalStorage` and `ObjectStorage` only. Chunk data always goes through TensorStore
(``kvstore_spec``); the few small files the commit protocol needs (metadata, state
file), listing and deletion go through the methods here.

Commit rule (see docs/FORMAT.md): a checkpoint exists iff its metadata file exists.
On a local filesystem the save is also staged in a sibling ``<prefix>.tmp-<id>/``
directory and renamed into place after the metadata is fsynced, so a crashed save
never even occupies the final name. Object stores have no rename: there a save writes
straight into its final prefix and the metadata file, written last, is the only commit
(see `ObjectStorage` and docs/OBJECT_STORAGE.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import stat
import uuid

import tensorstore as ts

from . import _tensorstore as tsio
from ._metadata import METADATA_FILE as METADATA
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["LocalStorage", "ObjectStorage", "open_storage", "is_url", "TMP_MARKER"]

logger = logging.getLogger(__name__)

TMP_MARKER = ".tmp-"


def is_url(path) -> bool:
    """Whether ``path`` names an object store location (``scheme://...``), not a file."""
    return "://" in os.fspath(path)


def open_storage(path, *, timeout_secs: float | None = None) -> LocalStorage | ObjectStorage:
    """Returns the storage for a checkpoint location.

    Args:
      path: a local path, or ``s3://bucket/prefix`` / ``gs://bucket/prefix``.
      timeout_secs: bound on each wait for storage (``timeout_secs`` attribute, used
        by the storage itself and by the engine's TensorStore waits); None: the
        default of calls without options (`_tensorstore.default_timeout_secs`).

    Raises:
      ValueError: a URL with another scheme, no bucket, or ``.``/``..`` components.
    """
    path = os.fspath(path)
    timeout_secs = timeout_secs or tsio.default_timeout_secs()
    if is_url(path):
        return ObjectStorage(path, timeout_secs=timeout_secs)
    return LocalStorage(path, timeout_secs=timeout_secs)


class LocalStorage:
    """A checkpoint directory on a local (or POSIX shared) filesystem."""

    # A staged save is renamed into place (see `publish`).
    renames_atomically = True

    def __init__(self, path: str, *, timeout_secs: float | None = None):
        self.path = os.path.abspath(path)
        # Bound on the engine's TensorStore waits on these files (see open_storage).
        self.timeout_secs = timeout_secs or tsio.default_timeout_secs()

    def __repr__(self):
        return f"LocalStorage({self.path!r})"

    def join(self, relpath: str) -> str:
        """The full path of ``relpath``, for messages and for callers' own paths."""
        return os.path.join(self.path, relpath)

    def child(self, relpath: str) -> LocalStorage:
        return LocalStorage(os.path.join(self.path, relpath), timeout_secs=self.timeout_secs)

    def make_dirs(self) -> None:
        os.makedirs(self.path, exist_ok=True)

    def list_dir(self, relpath: str = "") -> list[str]:
        """Sorted names of the entries of a sub-directory; [] when it does not exist."""
        try:
            return sorted(os.listdir(os.path.join(self.path, relpath)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, relpath: str = "") -> list[str]:
        """Sorted paths, relative to ``relpath`` and "/"-separated, of every file under it.

        Links to directories are not followed (`verify` reports links separately).
        """
        root = os.path.join(self.path, relpath)
        found = []
        for dirpath, _, filenames in os.walk(root):
            found.extend(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                         for f in filenames)
        return sorted(found)

    def remove(self, relpath: str) -> bool:
        """Deletes one file or sub-tree (a link itself, never its target) durably.

        No symbolic link is followed: a link is unlinked as a link, and a ``relpath``
        that reaches its last component through a link is refused, so a hostile or
        mistaken link never makes deletion touch anything outside this directory.

        Returns:
          Whether it existed.
        Raises:
          CheckpointError: a component of ``relpath`` before the last is a link.
        """
        full = self._no_links_before_last(relpath)
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(mode):
            # rmtree works on directory fds and unlinks links inside, never following.
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.remove(full)
            except FileNotFoundError:
                return False
        fsync_dir(os.path.dirname(full))
        return True

    def is_link(self) -> bool:
        """Whether this storage's own path is a symbolic link (deletion never follows)."""
        return os.path.islink(self.path)

    def _no_links_before_last(self, relpath: str) -> str:
        full = os.path.join(self.path, relpath)
        parts = [p for p in os.path.normpath(relpath).split(os.sep) if p not in ("", ".")]
        if ".." in parts or os.path.isabs(relpath):
            raise CheckpointError(f"{full}: refusing a path that leaves {self.path}")
        for i in range(1, len(parts)):
            inner = os.path.join(self.path, *parts[:i])
            if os.path.islink(inner):
                raise CheckpointError(
                    f"Refusing to delete {full}: {inner} is a symbolic link (to "
                    f"{os.readlink(inner)!r}); expected a plain directory"
                )
        return full

    def kvstore_spec(self, relpath: str = "") -> dict:
        """TensorStore kvstore spec of a sub-directory (trailing slash: a directory)."""
        return {"driver": "file", "path": os.path.join(self.path, relpath, "")}

    def exists(self, relpath: str = "") -> bool:
        return os.path.exists(os.path.join(self.path, relpath))

    def read_bytes(self, relpath: str, *, max_bytes: int) -> bytes:
        """Reads a small file; refuses one larger than ``max_bytes`` (untrusted input).

        Only a regular file is read. The file is opened without blocking and without
        following a final symbolic link, then checked with ``fstat``: a FIFO, socket,
        device or directory under a checkpoint's file name is refused at once (a FIFO
        would otherwise block the reader forever).

        Raises:
          FileNotFoundError: no such file.
          CorruptCheckpointError: a link, not a regular file, or too large.
        """
        full = self.resolve_inside(relpath)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP):
                raise CorruptCheckpointError(
                    f"{full}: expected a regular file, found "
                    f"{_kind(os.lstat(full).st_mode)}"
                ) from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise CorruptCheckpointError(f"{full}: expected a regular file, found {_kind(mode)}")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise CorruptCheckpointError(f"{full}: larger than the {max_bytes}-byte limit")
        return data

    def scan_files(self, relpath: str) -> list[str]:
        """Paths of the files under ``relpath`` (relative to it), refusing odd entries.

        For data that TensorStore is about to open: every entry must be a plain file or
        directory. A FIFO would block the read forever, a device could be endless, and a
        link could lead anywhere, so each is a CorruptCheckpointError naming it. Reads
        only directory entries (``d_type``), no ``stat`` per file.
        """
        root = os.path.join(self.path, relpath)
        found, stack = [], [""]
        while stack:
            sub = stack.pop()
            try:
                entries = list(os.scandir(os.path.join(root, sub)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{sub}/{entry.name}" if sub else entry.name
                if entry.is_symlink():
                    raise CorruptCheckpointError(
                        f"{entry.path}: a symbolic link (to {os.readlink(entry.path)!r}); "
                        "expected a regular file or directory"
                    )
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    found.append(rel)
                else:
                    raise CorruptCheckpointError(
                        f"{entry.path}: expected a regular file or directory, found "
                        f"{_kind(entry.stat(follow_symlinks=False).st_mode)}"
                    )
        return sorted(found)

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
        remove_tree_parallel(self.path)

    # -- staging and commit (coordinator only) --------------------------------------

    def staging(self, save_id: str) -> LocalStorage:
        """The sibling directory a save writes into before it is renamed into place."""
        return LocalStorage(f"{self.path}{TMP_MARKER}{save_id}", timeout_secs=self.timeout_secs)

    def publish(self, staged: LocalStorage) -> None:
        """Moves a fully written and fsynced staging directory to this path.

        An existing checkpoint at this path is swapped out atomically (renameat2
        RENAME_EXCHANGE), so a crash leaves either the old or the new one in place.
        """
        parent = os.path.dirname(self.path)
        if os.path.lexists(self.path):
            _exchange(staged.path, self.path)
            # staged.path now holds what was replaced: a link is unlinked, never followed.
            if os.path.islink(staged.path) or not os.path.isdir(staged.path):
                os.remove(staged.path)
            else:
                shutil.rmtree(staged.path)
        else:
            os.rename(staged.path, self.path)
        fsync_dir(parent)


# Object store schemes and their TensorStore kvstore drivers.
_DRIVERS = {"s3": "s3", "gs": "gcs"}
# Where the S3 endpoint comes from, first match wins (MinIO, Ceph, moto, ...).
ENDPOINT_VARIABLES = ("DCHECKPOINT_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


class ObjectStorage:
    """A checkpoint prefix in an object store (``s3://bucket/key`` or ``gs://bucket/key``).

    Chunks, small files, listing and deletion all go through TensorStore's kvstore
    drivers, so no cloud SDK is needed. Credentials come from the drivers' usual
    sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance
    roles; Google's application default credentials); the S3 endpoint and region from
    `ENDPOINT_VARIABLES` and `REGION_VARIABLES`.

    Object stores cannot rename, so a save writes into its final prefix (`staging`
    returns this storage itself) and `publish` does nothing: the metadata file, written
    last by the coordinator in one PUT, is the commit. A prefix without it is ignored
    by every reader.

    Every write is a plain PUT (never create-if-absent) and every deletion a range
    delete, so each request is idempotent: TensorStore retries one whose response was
    lost without changing its outcome. Every wait is bounded by ``timeout_secs`` and
    raises `StorageTimeoutError` naming the operation and the path.

    Raises:
      ValueError: an unknown scheme, no bucket, or a ``.``/``..``/empty key component.
    """

    renames_atomically = False

    def __init__(self, url: str, *, timeout_secs: float | None = None):
        scheme, _, rest = url.partition("://")
        bucket, _, key = rest.partition("/")
        if scheme not in _DRIVERS or not bucket:
            raise ValueError(
                f"Unsupported checkpoint location {url!r}: expected a local path, "
                f"s3://bucket/prefix or gs://bucket/prefix"
            )
        self._scheme, self._bucket = scheme, bucket
        self._key = _clean_key(key.rstrip("/"), where=url)
        self.path = f"{scheme}://{bucket}" + (f"/{self._key}" if self._key else "")
        self.timeout_secs = timeout_secs or tsio.default_timeout_secs()
        self._store = None

    def __repr__(self):
        return f"ObjectStorage({self.path!r})"

    def join(self, relpath: str) -> str:
        key = _clean_key(relpath.rstrip("/"), where=relpath)
        return f"{self.path}/{key}" if key else self.path

    def child(self, relpath: str) -> ObjectStorage:
        return ObjectStorage(self.join(relpath), timeout_secs=self.timeout_secs)

    def make_dirs(self) -> None:
        """Nothing to do: prefixes exist as soon as a key under them does."""

    def kvstore_spec(self, relpath: str = "") -> dict:
        """TensorStore kvstore spec of a sub-prefix (trailing slash: a "directory")."""
        key = "/".join(filter(None, [self._key, _clean_key(relpath.rstrip("/"), where=relpath)]))
        spec = {"driver": _DRIVERS[self._scheme], "bucket": self._bucket,
                "path": f"{key}/" if key else ""}
        if self._scheme == "s3":
            spec.update(s3_options())
        return spec

    def _wait(self, future, what: str, relpath: str = "", *, write: bool = False):
        where = self.join(relpath) if relpath else self.path
        return tsio.wait(future, timeout_secs=self.timeout_secs, what=f"{what} {where}",
                         abandon_under=where if write else None)

    def _kv(self):
        if self._store is None:
            self._store = self._wait(
                ts.KvStore.open(self.kvstore_spec(), context=tsio.context()), "opening")
        return self._store

    def _keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` ("" for all), relative to this storage."""
        key_range = ts.KvStore.KeyRange(prefix, _successor(prefix)) if prefix else None
        keys = self._wait(self._kv().list(key_range), "listing", prefix.rstrip("/"))
        # Only what was asked for: a server that ignores the range's end (the GCS
        # emulator lists the whole common prefix) must not add neighbours' keys.
        return [k for k in (k.decode() for k in keys) if k.startswith(prefix)]

    def exists(self, relpath: str = "") -> bool:
        """Whether an object ``relpath``, or any object under it, exists."""
        key = self.resolve_key(relpath) if relpath else ""
        if key and key.encode() in self._wait(
                self._kv().list(ts.KvStore.KeyRange(key, key + "\0")), "looking up", key):
            return True
        return bool(self._keys(f"{key}/" if key else ""))

    def read_bytes(self, relpath: str, *, max_bytes: int) -> bytes:
        """Reads a small object; refuses one larger than ``max_bytes`` (untrusted input).

        Raises:
          FileNotFoundError: no such object.
        """
        key = self.resolve_key(relpath)
        result = self._wait(self._kv().read(key), "reading", key)
        if result.state != "value":
            raise FileNotFoundError(errno.ENOENT, "No such object", self.join(relpath))
        if len(result.value) > max_bytes:
            raise CorruptCheckpointError(
                f"{self.join(relpath)}: larger than the {max_bytes}-byte limit"
            )
        return result.value

    def write_bytes_atomic(self, relpath: str, data: bytes) -> None:
        """One PUT: object stores show readers the old object or the new, never a mix.

        A PUT of the same object given up on earlier must land (or fail) first, or it
        could replace this one later (see `_tensorstore.settle_abandoned`).
        """
        key = self.resolve_key(relpath)
        tsio.settle_abandoned(self.join(key), timeout_secs=self.timeout_secs)
        self._wait(self._kv().write(key, data), "writing", key, write=True)

    def resolve_key(self, relpath: str) -> str:
        """The key of ``relpath``, refusing anything that could leave this prefix."""
        if not isinstance(relpath, str) or relpath.startswith("/") or "\\" in relpath:
            raise CorruptCheckpointError(
                f"{relpath!r} is not a relative key inside {self.path}"
            )
        return _clean_key(relpath, where=self.path)

    def resolve_inside(self, relpath: str) -> str:
        """Full URL of ``relpath``; refuses ``..``, ``.``, empty or absolute components."""
        return self.join(self.resolve_key(relpath))

    def list_dir(self, relpath: str = "") -> list[str]:
        """Sorted first components of the keys under ``relpath`` (every key is listed)."""
        key = self.resolve_key(relpath) if relpath else ""
        prefix = f"{key}/" if key else ""
        return sorted({k[len(prefix):].split("/", 1)[0] for k in self._keys(prefix)})

    def list_files(self, relpath: str = "") -> list[str]:
        """Sorted keys, relative to ``relpath``, of every object under ``relpath/``."""
        key = self.resolve_key(relpath) if relpath else ""
        prefix = f"{key}/" if key else ""
        return sorted(k[len(prefix):] for k in self._keys(prefix))

    def remove(self, relpath: str) -> bool:
        """Deletes the object ``relpath`` and everything under ``relpath/``.

        Returns:
          Whether anything existed.
        """
        existed = self.exists(relpath)
        key = self.resolve_key(relpath)
        self._wait(self._kv().delete_range(ts.KvStore.KeyRange(key, key + "\0")),
                   "deleting", key)
        self._wait(self._kv().delete_range(ts.KvStore.KeyRange(f"{key}/", _successor(f"{key}/"))),
                   "deleting everything under", key)
        return existed

    def remove_tree(self) -> None:
        """Deletes every object under this prefix, as far as the store lets it.

        Best effort, as `LocalStorage.remove_tree`: it runs as cleanup after a failed
        save and in retention after the commit marker is gone, where what it cannot
        delete is an uncommitted prefix that no reader takes for a checkpoint and the
        next manager removes. A failure is logged, so that it never hides the error
        that made a save clean up.
        """
        if not self._key:
            raise CheckpointError(f"Refusing to delete every object of {self.path}")
        try:
            self._wait(self._kv().delete_range(ts.KvStore.KeyRange()), "deleting everything under")
        except Exception as e:  # noqa: BLE001 (logged; see the docstring)
            logger.warning("could not delete %s: %s", self.path, e)

    # -- staging and commit ----------------------------------------------------------

    def staging(self, save_id: str) -> ObjectStorage:
        """This prefix itself, first made uncommitted (all processes, before any write).

        There is no rename, so a save overwrites in place. Removing the metadata file
        first means no reader ever takes a mix of old and new chunks for a checkpoint.
        The old ``zarr.json`` nodes may stay: the coordinator overwrites each with a
        plain PUT when it commits (see `_tensorstore.array_node`). Writes an earlier
        save of this process gave up on under this prefix (chunks, nodes, its marker)
        must land (or fail) first.
        """
        del save_id
        tsio.settle_abandoned(self.path, timeout_secs=self.timeout_secs)
        self._wait(self._kv().delete_range(ts.KvStore.KeyRange(METADATA, METADATA + "\0")),
                   "uncommitting (deleting the metadata file of)")
        return self

    def publish(self, staged: ObjectStorage) -> None:
        """Nothing to do: the metadata file the coordinator just wrote is the commit."""
        del staged


def s3_options() -> dict:
    """Endpoint and region of the S3 driver from the environment (see module docs)."""
    options = {}
    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if endpoint:
        options["endpoint"] = endpoint
    region = next((os.environ[v] for v in REGION_VARIABLES if os.environ.get(v)), None)
    if region:
        options["aws_region"] = region
    return options


def _clean_key(key: str, *, where: str) -> str:
    """``key`` if it is "" or plain components joined by "/"; refuses the rest."""
    parts = key.split("/") if key else []
    if any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpointError(
            f"{where!r}: key {key!r} has an empty, '.' or '..' component; object store "
            "keys must stay inside their prefix"
        )
    return key


def _successor(prefix: str) -> str:
    """The smallest string after every string that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _kind(mode: int) -> str:
    """What a file mode is, in words, for messages."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else f"file mode {mode:o}"


def fsync_dir(path: str) -> None:
    """Makes a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Makes every entry under ``path`` durable, once, with the fsyncs running together.

    Files need nothing: TensorStore (``file_io_sync``) fsyncs each file it writes and
    then its directory, and `LocalStorage.write_bytes_atomic` does the same. What
    nobody fsynced is the entry of each directory created on the way, so only the
    directories that hold sub-directories are fsynced (and ``path`` itself). fsync
    waits on the disk, not the CPU, so they run on threads.

    A no-op for object store URLs: they have no directories, and an acknowledged PUT
    is already durable.
    """
    if is_url(path):
        return
    parents = [path] + [d for d, subdirs, _ in os.walk(path) if subdirs and d != path]
    _on_threads(fsync_dir, parents)


_IO_THREADS = 16


def _on_threads(fn, items: list) -> None:
    """``fn(item)`` for every item, on threads; serially once the interpreter is exiting.

    An async save may still commit while the interpreter exits (it waits for it), and
    then concurrent.futures accepts no more work.
    """
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    try:
        pool = concurrent.futures.ThreadPoolExecutor(min(_IO_THREADS, len(items)))
        futures = [pool.submit(fn, item) for item in items]
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        for item in items:
            fn(item)
        return
    with pool:
        for future in futures:
            future.result()


def remove_tree_parallel(path: str) -> None:
    """``shutil.rmtree(path, ignore_errors=True)``, its top-level entries on threads.

    Unlinks wait on the disk's journal, not the CPU, so a checkpoint of thousands of
    array directories goes several times faster this way. Links inside are removed,
    never followed; ``path`` itself being a link is refused, as rmtree refuses it.
    """
    try:
        entries = [] if os.path.islink(path) else list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return

    def remove(entry: os.DirEntry) -> None:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    _on_threads(remove, entries)
    shutil.rmtree(path, ignore_errors=True)  # whatever appeared meanwhile, and path


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


