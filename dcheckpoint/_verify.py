"""``verify(path)``: read a whole checkpoint back and report everything wrong with it.

A restore stops at the first bad chunk, and reads only what its target needs. An
operator deciding whether weeks of training are safe wants the full picture instead:
every chunk of every array read and checked against its crc32c, every array's chunk
grid covered exactly by files, no symbolic links, no stray files. ``verify`` never
raises on a damaged checkpoint; it returns a report listing each problem by array.

Memory stays bounded by a few chunks: chunks are read in small windows, and an
uncompressed chunk whose file has the wrong size is reported without being decoded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

from . import _tensorstore as tsio
from ._engine import read_metadata
from ._metadata import ArrayMetadata
from ._storage import LocalStorage, open_storage
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["verify", "VerifyReport", "VerifyProblem"]

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
      bytes_read: size of the chunk files read, in bytes.
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


def verify(path: str | os.PathLike) -> VerifyReport:
    """Reads every chunk of the checkpoint at ``path`` and checks it.

    Returns:
      A `VerifyReport`; ``report.ok`` is True only if the metadata is valid, every
      array's chunk grid is covered by exactly its chunk files, every chunk passes
      its crc32c check, and the directory holds no symbolic link.
    Raises:
      Nothing for a damaged or missing checkpoint: that is reported.
    """
    path = os.fspath(path)
    storage = open_storage(path)
    problems: list[VerifyProblem] = [
        VerifyProblem(None, rel, message) for rel, message in _symlinks(storage.path)
    ]
    try:
        metadata = read_metadata(path)
    except CheckpointError as e:
        problems.append(VerifyProblem(None, "dcheckpoint.json", str(e)))
        return VerifyReport(path, 0, 0, 0, tuple(problems))
    chunks = nbytes = 0
    for name in sorted(metadata.arrays):
        checker = _ArrayChecker(storage, name, metadata.arrays[name])
        checker.run()
        chunks += checker.chunks
        nbytes += checker.nbytes
        problems.extend(checker.problems)
    return VerifyReport(path, len(metadata.arrays), chunks, nbytes, tuple(problems))


def _symlinks(root: str) -> list[tuple[str, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                found.append((os.path.relpath(full, root),
                              f"is a symbolic link to {os.readlink(full)!r}; expected a "
                              "plain file or directory"))
    return found


class _ArrayChecker:
    """Checks one array: zarr.json, grid coverage, chunk sizes and checksums."""

    def __init__(self, storage: LocalStorage, name: str, meta: ArrayMetadata):
        self.storage, self.name, self.meta = storage, name, meta
        self.chunks = self.nbytes = 0
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
        codecs = zarr_meta["codecs"]
        raw_size = None  # exact file size, known when no codec changes the length
        if [c["name"] for c in codecs] == ["bytes", "crc32c"]:
            raw_size = math.prod(self.meta.chunk_shape) * self.meta.dtype.itemsize
            raw_size += _CRC32C_BYTES
        expected = self._check_coverage()
        window = []
        for coords, rel in expected:
            if self._check_size(rel, raw_size):
                window.append((rel, array[self._slices(coords)].read()))
            if len(window) >= _READ_WINDOW:
                self._collect(window)
        self._collect(window)

    def _grid(self) -> list[tuple[int, ...]]:
        if 0 in self.meta.shape:
            return []
        counts = [-(-s // c) for s, c in zip(self.meta.shape, self.meta.chunk_shape,
                                             strict=True)]
        return list(itertools.product(*(range(n) for n in counts)))

    def _slices(self, coords) -> tuple[slice, ...]:
        return tuple(slice(i * c, min((i + 1) * c, s))
                     for i, c, s in zip(coords, self.meta.chunk_shape, self.meta.shape,
                                        strict=True))

    def _check_coverage(self) -> list[tuple[tuple[int, ...], str]]:
        """Every grid chunk has its file, and no file lies outside the grid."""
        base = self.meta.storage_path
        expected = [(c, "/".join([base, "c", *map(str, c)])) for c in self._grid()]
        present = set()
        chunk_root = os.path.join(self.storage.path, base, "c")
        for dirpath, _, filenames in os.walk(chunk_root):
            for f in filenames:
                rel = os.path.relpath(os.path.join(dirpath, f), self.storage.path)
                present.add(rel.replace(os.sep, "/"))
        if os.path.isfile(chunk_root):  # a rank-0 array's single chunk is "c" itself
            present.add(f"{base}/c")
        wanted = {rel for _, rel in expected}
        for rel in sorted(present - wanted):
            self.problem(rel, "unexpected file: not a chunk of the array's grid "
                         f"(grid {self._grid_shape()})")
        missing = [(c, rel) for c, rel in expected if rel not in present]
        for _, rel in missing:
            self.problem(rel, "missing chunk file: expected every chunk of the grid "
                         f"{self._grid_shape()} to be stored, found no file")
        return [(c, rel) for c, rel in expected if rel in present]

    def _grid_shape(self) -> list[int]:
        return [-(-s // c) for s, c in zip(self.meta.shape, self.meta.chunk_shape,
                                           strict=True)]

    def _check_size(self, rel: str, raw_size: int | None) -> bool:
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
        window.clear()
