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
import math
import os
import stat

from . import _packing
from . import _tensorstore as tsio
from ._bounds import chunk_nbytes, chunk_total, memory_limit
from ._engine import read_metadata
from ._gc import paused as _gc_paused
from ._metadata import ArrayMetadata, CheckpointMetadata
from ._storage import LocalStorage, ObjectStorage, _kind, open_storage
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["verify", "chunk_count", "VerifyReport", "VerifyProblem"]

_READ_WINDOW = 16  # chunks in flight at once
_CRC32C_BYTES = 4
_MAX_MISSING_LISTED = 20  # missing chunks named one by one; the rest are counted


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


_chunk_total = chunk_total


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
            self._check_regular(f"{self.meta.storage_path}/zarr.json")
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
        # TensorStore decodes a whole chunk at once: one larger than half this host's
        # memory (a crafted chunk shape, or a huge compressed one) is not decoded.
        limit = memory_limit() // 2
        too_big = chunk_nbytes(self.meta) > limit
        window, window_bytes = [], 0
        for coords, rel in self._check_coverage():
            if not self._check_size(rel, raw_size):
                continue
            if too_big:
                self.problem(rel, f"chunk of {list(self.meta.chunk_shape)} "
                             f"{self.meta.dtype.name} decodes to {chunk_nbytes(self.meta)} "
                             f"bytes, more than half this host's memory; not read")
                continue
            window.append((rel, array[self._slices(coords)].read()))
            window_bytes += chunk_nbytes(self.meta)
            if len(window) >= _READ_WINDOW or window_bytes > limit // 2:
                self._collect(window)
                window_bytes = 0
        self._collect(window)

    def _check_regular(self, rel: str) -> None:
        """Refuses a local file that is not a regular file (a FIFO hangs TensorStore)."""
        if not isinstance(self.storage, LocalStorage):
            return
        try:
            mode = os.lstat(os.path.join(self.storage.path, rel)).st_mode
        except FileNotFoundError:
            return  # reported by TensorStore as a missing zarr.json
        if not stat.S_ISREG(mode):
            raise CorruptCheckpointError(f"{rel}: expected a regular file, found {_kind(mode)}")

    def _slices(self, coords) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s))
                     for i, c, s in zip(coords, self.meta.chunk_shape, self.meta.shape,
                                        strict=True))

    def _check_coverage(self) -> list[tuple[tuple[int, ...], str]]:
        """Every grid chunk has its file, and no file lies outside the grid.

        Works from the listing, never from the declared grid, so a crafted grid of
        2**61 chunks costs what the files present cost: each file is parsed into grid
        coordinates, and the grid itself is walked only until `_MAX_MISSING_LISTED`
        missing chunks are named (at most that many steps past the files present).
        """
        base = self.meta.storage_path
        grid = list(self.meta.chunk_grid)
        total = _chunk_total(self.meta)
        found = {}
        # A rank-0 array's single chunk is the file "c" itself, so list the array.
        for f in self.storage.list_files(base):
            if f != "c" and not f.startswith("c/"):
                continue
            rel = f"{base}/{f}"
            coords = _coords(f, grid)
            if coords is None or total == 0:
                self.problem(rel, "unexpected file: not a chunk of the array's grid "
                             f"(grid {grid})")
            else:
                found[coords] = rel
        missing = total - len(found)
        if missing:
            named = 0
            for coords in _grid_coords(grid):
                if coords in found:
                    continue
                self.problem("/".join([base, "c", *map(str, coords)]),
                             "missing chunk file: expected every chunk of the grid "
                             f"{grid} to be stored, found no file")
                named += 1
                if named == _MAX_MISSING_LISTED or named == missing:
                    break
            if missing > named:
                self.problem(f"{base}/c", f"... and {missing - named} more missing chunk "
                             f"files (grid {grid}: {total} chunks, {len(found)} present)")
        return sorted(found.items())

    def _check_size(self, rel: str, raw_size: int | None) -> bool:
        """Counts a chunk's bytes before it is read; False if its file has the wrong size."""
        if not isinstance(self.storage, LocalStorage):
            # Object stores list no sizes: count the stored (else the decoded) size;
            # a truncated chunk fails its crc32c when read.
            self.nbytes += raw_size or math.prod(self.meta.chunk_shape) * \
                self.meta.dtype.itemsize
            return True
        info = os.lstat(os.path.join(self.storage.path, rel))
        if not stat.S_ISREG(info.st_mode):
            self.problem(rel, f"expected a regular chunk file, found {_kind(info.st_mode)}")
            return False
        size = info.st_size
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


def _coords(relpath: str, grid: list[int]) -> tuple[int, ...] | None:
    """Grid coordinates of a chunk key ``c/i/j/...``, or None if it is not one."""
    parts = relpath.split("/")[1:]
    if len(parts) != len(grid):
        return None
    coords = []
    for part, n in zip(parts, grid, strict=True):
        if not (part.isascii() and part.isdigit()) or part != str(int(part)) or int(part) >= n:
            return None
        coords.append(int(part))
    return tuple(coords)


def _grid_coords(grid: list[int]):
    """Yields every coordinate of ``grid`` in order, lazily (``itertools.product``
    would first build a tuple of each whole ``range``: 2**30 entries for a crafted grid)."""
    if 0 in grid:
        return
    coords = [0] * len(grid)
    while True:
        yield tuple(coords)
        for dim in reversed(range(len(grid))):
            coords[dim] += 1
            if coords[dim] < grid[dim]:
                break
            coords[dim] = 0
        else:
            return
