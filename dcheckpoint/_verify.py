"""``verify(path)``: read a whole checkpoint back and report everything wrong with it.

A restore stops at the first bad chunk, and reads only what its target needs. An
operator deciding whether weeks of training are safe wants the full picture instead:
every chunk of every array read and checked against its crc32c, every array's chunk
grid covered exactly by files, no symbolic links, no stray files. ``verify`` never
raises on a damaged checkpoint; it returns a report listing each problem by array.
It works on local directories and object stores alike, through `open_storage`; the
checks that need a filesystem (links, file sizes) run on local directories only.

Memory stays bounded by a few chunks: chunks are read in small windows, and an
uncompressed chunk whose file has the wrong size is reported without being decoded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

from . import _packing
from . import _tensorstore as tsio
from ._engine import read_metadata
from ._gc import paused as _gc_paused
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._storage import LocalStorage, ObjectStorage, open_storage
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["verify", "chunk_count", "VerifyReport", "VerifyProblem"]

_READ_WINDOW = 16  # chunks in flight at once
_CRC32C_BYTES = 4


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyProblem:
    """One thing wrong with a checkpoint.

    Attributes:
      array: the logical array path, or None for the checkpoint as a whole.
      file: the file concerned, relative to the checkpoint directory, or None.
      message: what was expected and what was found.
    """

    array: str | None
    file: str | None
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` found.

    Attributes:
      path: the checkpoint directory.
      arrays_checked: arrays listed in the metadata.
      chunks_checked: chunk files read and decoded.
      bytes_read: size of the chunk files read, in bytes (on object stores, which list
        no sizes: the stored size of uncompressed chunks, else their decoded size).
      problems: everything wrong, in the order found; empty for a sound checkpoint.
    """

    path: str
    arrays_checked: int
    chunks_checked: int
    bytes_read: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def problems_by_array(self) -> dict[str | None, list[str]]:
        """{array path (None: the checkpoint itself): [messages]}."""
        grouped: dict[str | None, list[str]] = {}
        for p in self.problems:
            grouped.setdefault(p.array, []).append(
                f"{p.file}: {p.message}" if p.file else p.message
            )
        return grouped

    def raise_if_failed(self) -> None:
        """Raises CorruptCheckpointError summarising the problems, if there are any."""
        if self.problems:
            lines = [f"  {p.array or '<checkpoint>'}: {p.file or ''} {p.message}"
                     for p in self.problems[:20]]
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise CorruptCheckpointError(
                f"Checkpoint {self.path!r} failed verification with "
                f"{len(self.problems)} problem(s):\n" + "\n".join(lines) + more
            )


@_gc_paused
def verify(path: str | os.PathLike, *, progress=None) -> VerifyReport:
    """Reads every chunk of the checkpoint at ``path`` and checks it.

    Works on local directories and on object stores (``s3://``, ``gs://``) alike.
    Some checks need a filesystem and run only on local directories: symbolic links,
    and the size of an uncompressed chunk file before it is decoded. On an object
    store a truncated chunk still fails its crc32c when it is read.

    Args:
      path: a checkpoint directory or object store URL.
      progress: optional; called with the number of chunks just checked (a count to
        add, like ``tqdm.update``), or an object with such an ``update`` method, such
        as a tqdm bar of total `chunk_count` of the metadata.

    Returns:
      A `VerifyReport`; ``report.ok`` is True only if the metadata is valid, every
      array's chunk grid is covered by exactly its chunk files, every chunk passes
      its crc32c check, and the directory holds no symbolic link.
    Raises:
      Nothing for a damaged or missing checkpoint: that is reported.
    """
    path = os.fspath(path)
    storage = open_storage(path)
    advance = getattr(progress, "update", progress) or (lambda n: None)
    problems: list[VerifyProblem] = [
        VerifyProblem(None, rel, message) for rel, message in _symlinks(storage)
    ]
    try:
        metadata = read_metadata(path)
    except CheckpointError as e:
        problems.append(VerifyProblem(None, "dcheckpoint.json", str(e)))
        return VerifyReport(path, 0, 0, 0, tuple(problems))
    found, chunks, nbytes = _packing.verify(storage, metadata, advance)
    problems.extend(VerifyProblem(*p) for p in found)
    for name in sorted(metadata.arrays):
        if metadata.packed and metadata.packed.holds(name):
            continue  # checked above, with the packed file that holds it
        checker = _ArrayChecker(storage, name, metadata.arrays[name], advance)
        checker.run()
        # Chunks never read (missing, wrong size, array unreadable) still count as done.
        if left := _chunk_total(metadata.arrays[name]) - checker.advanced:
            advance(left)
        chunks += checker.chunks
        nbytes += checker.nbytes
        problems.extend(checker.problems)
    return VerifyReport(path, len(metadata.arrays), chunks, nbytes, tuple(problems))


def chunk_count(metadata: CheckpointMetadata) -> int:
    """How many chunks `verify` checks in a checkpoint: the ``total`` of a progress bar."""
    return sum(_chunk_total(a) for a in metadata.arrays.values())


def _grid_shape(meta: ArrayMetadata) -> list[int]:
    """Chunks along each dimension."""
    return [-(-s // c) for s, c in zip(meta.shape, meta.chunk_shape, strict=True)]


def _chunk_total(meta: ArrayMetadata) -> int:
    return 0 if 0 in meta.shape else math.prod(_grid_shape(meta))


def _symlinks(storage: LocalStorage | ObjectStorage) -> list[tuple[str, str]]:
    """Links in a local directory, which could lead reads outside it (objects: none)."""
    if not isinstance(storage, LocalStorage):
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(storage.path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                found.append((os.path.relpath(full, storage.path),
                              f"is a symbolic link to {os.readlink(full)!r}; expected a "
                              "plain file or directory"))
    return found


class _ArrayChecker:
    """Checks one array: zarr.json, grid coverage, chunk sizes and checksums."""

    def __init__(self, storage: LocalStorage | ObjectStorage, name: str,
                 meta: ArrayMetadata, advance):
        self.storage, self.name, self.meta, self.advance = storage, name, meta, advance
        self.chunks = self.nbytes = self.advanced = 0
        self.problems: list[VerifyProblem] = []

    def problem(self, file: str | None, message: str) -> None:
        self.problems.append(VerifyProblem(self.name, file, message))

    def run(self) -> None:
        try:
            self.storage.resolve_inside(self.meta.storage_path)
            array = tsio.open_for_read(
                self.storage.kvstore_spec(self.meta.storage_path), self.meta
            ).result()
        except CorruptCheckpointError as e:
            self.problem(self.meta.storage_path, str(e))
            return
        except Exception as e:  # noqa: BLE001 (reported, never raised)
            error = tsio.translate_error(e, array=self.name, where=self.storage.path)
            self.problem(f"{self.meta.storage_path}/zarr.json", str(error))
            return
        zarr_meta = array.spec().to_json()["metadata"]
        stored_chunk = tuple(zarr_meta["chunk_grid"]["configuration"]["chunk_shape"])
        if stored_chunk != self.meta.chunk_shape:
            self.problem(f"{self.meta.storage_path}/zarr.json",
                         f"chunk shape {list(stored_chunk)}, expected "
                         f"{list(self.meta.chunk_shape)} from the metadata")
            return
        raw_size = None  # exact file size, known when no codec changes the length
        if [c["name"] for c in zarr_meta["codecs"]] == ["bytes", "crc32c"]:
            raw_size = math.prod(self.meta.chunk_shape) * self.meta.dtype.itemsize
            raw_size += _CRC32C_BYTES
        window = []
        for coords, rel in self._check_coverage():
            if self._check_size(rel, raw_size):
                window.append((rel, array[self._slices(coords)].read()))
            if len(window) >= _READ_WINDOW:
                self._collect(window)
        self._collect(window)

    def _slices(self, coords) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s))
                     for i, c, s in zip(coords, self.meta.chunk_shape, self.meta.shape,
                                        strict=True))

    def _check_coverage(self) -> list[tuple[tuple[int, ...], str]]:
        """Every grid chunk has its file, and no file lies outside the grid."""
        base = self.meta.storage_path
        coords = [] if 0 in self.meta.shape else itertools.product(
            *(range(n) for n in _grid_shape(self.meta)))
        expected = [(c, "/".join([base, "c", *map(str, c)])) for c in coords]
        # A rank-0 array's single chunk is the file "c" itself, so list the array.
        present = {f"{base}/{f}" for f in self.storage.list_files(base)
                   if f == "c" or f.startswith("c/")}
        wanted = {rel for _, rel in expected}
        for rel in sorted(present - wanted):
            self.problem(rel, "unexpected file: not a chunk of the array's grid "
                         f"(grid {_grid_shape(self.meta)})")
        for _, rel in expected:
            if rel not in present:
                self.problem(rel, "missing chunk file: expected every chunk of the grid "
                             f"{_grid_shape(self.meta)} to be stored, found no file")
        return [(c, rel) for c, rel in expected if rel in present]

    def _check_size(self, rel: str, raw_size: int | None) -> bool:
        """Counts a chunk's bytes before it is read; False if its file has the wrong size."""
        if not isinstance(self.storage, LocalStorage):
            # Object stores list no sizes: count the stored (else the decoded) size;
            # a truncated chunk fails its crc32c when read.
            self.nbytes += raw_size or math.prod(self.meta.chunk_shape) * \
                self.meta.dtype.itemsize
            return True
        size = os.path.getsize(os.path.join(self.storage.path, rel))
        if raw_size is not None and size != raw_size:
            self.problem(rel, f"chunk file is {size} bytes, expected {raw_size} "
                         "(truncated or padded)")
            return False
        self.nbytes += size
        return True

    def _collect(self, window: list) -> None:
        for rel, future in window:
            try:
                future.result()
                self.chunks += 1
            except Exception as e:  # noqa: BLE001 (reported, never raised)
                error = tsio.translate_error(e, array=self.name, where=self.storage.path)
                self.problem(rel, str(error))
        if window:
            self.advance(len(window))
            self.advanced += len(window)
        window.clear()
