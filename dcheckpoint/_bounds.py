"""What a restore checks before it allocates anything for a (possibly crafted) array.

Metadata is signed, but anyone can sign it: a 500-byte file may declare a shape of
``[2**31, 2**30]`` with ``[1, 1]`` chunks. Read naively, that is a chunk grid of 2**61
entries in Python, or a buffer TensorStore cannot allocate (``std::bad_alloc`` aborts
the whole process, no exception to catch). So before a restore opens an array:

* the largest piece this process reads in one buffer (one device's slice, or a host
  target's whole array), and the largest chunk TensorStore would decode, must fit in
  this host's physical memory (a larger one could never be allocated anyway). The sum
  over all arrays is not bounded: reads are windowed, and a restore may stream to
  devices more than the host holds at once;
* the declared chunk grid must match the chunk files that exist: a committed array
  stores every chunk as a file, so a grid larger than the listing is a crafted or
  damaged array. On a local filesystem every file of the array is also checked to be
  a regular file or directory (a FIFO would hang the reader, a device could be
  endless, a link could lead anywhere); that costs one directory read per directory,
  no ``stat`` per file. Object stores are listed only for arrays that declare more
  than `LIST_ABOVE_CHUNKS` chunks: a LIST per small array would slow every restore,
  and a small grid is harmless.
"""

from __future__ import annotations

import itertools
import math
import os
import stat

from ._metadata import METADATA_FILE, ArrayMetadata
from ._storage import LocalStorage
from .errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["memory_limit", "chunk_total", "check_restore", "check_stored",
           "LIST_ABOVE_CHUNKS"]

LIST_ABOVE_CHUNKS = 4096
_LOCAL_CHECK_CHUNKS = 1 << 16  # chunk files one process checks one by one, at most


def memory_limit() -> int:
    """This host's physical memory in bytes (the bound on what one restore may hold)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


def chunk_total(meta: ArrayMetadata) -> int:
    """How many chunk files a committed array has (a big int is fine: nothing is built)."""
    return 0 if 0 in meta.shape else math.prod(meta.chunk_grid)


def chunk_nbytes(meta: ArrayMetadata) -> int:
    return math.prod(meta.chunk_shape) * meta.dtype.itemsize


def check_restore(storage, where: str, metadata, plans: dict) -> None:
    """Refuses a restore whose arrays could not have been saved as declared.

    Args:
      storage: the checkpoint's storage.
      where: the checkpoint's path, for messages.
      metadata: its `CheckpointMetadata`.
      plans: {array path: (sharding or None, reads)} as from `plan_read`; the
        stored side of packed arrays is their packed file's (`_packing.restore` checks
        it with `check_stored`).

    Raises:
      CorruptCheckpointError: naming the array, what it declares and what was found.
    """
    limit = memory_limit()
    for path, (_, reads) in plans.items():
        if not reads:
            continue
        meta = metadata.arrays[path]
        largest = max(math.prod(s.stop - s.start for s in r.index) for r in reads)
        if largest * meta.dtype.itemsize > limit:
            raise CorruptCheckpointError(
                f"Array {path!r} in {where}: shape {list(meta.shape)} {meta.dtype.name} "
                f"needs {largest * meta.dtype.itemsize} bytes in one piece of this "
                f"process, more than this host's {limit} bytes of memory; refusing to read"
            )
        if not (metadata.packed and metadata.packed.holds(path)):
            check_stored(storage, path, meta, where, reads=[r.index for r in reads])


def check_stored(storage, name: str, meta: ArrayMetadata, where: str, *,
                 reads: list | None = None) -> None:
    """Refuses a stored array (a saved array's, or a packed file's) whose chunks could
    not be decoded in this host's memory, or whose chunk grid has more chunks than files
    exist; ``name`` is what messages call it. ``reads``: the global slices this process
    reads (None: all of it)."""
    limit = memory_limit()
    if chunk_nbytes(meta) > limit:
        raise CorruptCheckpointError(
            f"Array {name!r} in {where}: declares chunks of {list(meta.chunk_shape)} "
            f"{meta.dtype.name} ({chunk_nbytes(meta)} bytes each), more than this "
            f"host's {limit} bytes of memory; refusing to read it"
        )
    check_chunk_files(storage, name, meta, where, reads=reads)


def check_chunk_files(storage, name: str, meta: ArrayMetadata, where: str, *,
                      reads: list | None = None) -> None:
    """Refuses an array whose declared chunk grid has more chunks than files exist.

    On a local filesystem, a process that reads fewer chunks than the array has checks
    only those files (one ``lstat`` per path component): a restore by each of P hosts
    must not read every host's directory entries (at 1,024 hosts x 8 devices, 0.1 s
    per array and host; see docs/SCALING.md).
    """
    expected = chunk_total(meta)
    local = _chunks_read(meta, reads) if reads is not None and expected else None
    if isinstance(storage, LocalStorage) and local is not None and len(local) < expected:
        _check_local_chunks(storage, name, meta, where, local)
        return
    if isinstance(storage, LocalStorage):
        files = storage.scan_files(meta.storage_path)
    elif expected > LIST_ABOVE_CHUNKS:
        files = storage.list_files(meta.storage_path)
    else:
        return
    found = sum(1 for f in files if f == "c" or f.startswith("c/"))
    if found < expected and not storage.exists(METADATA_FILE):
        raise CheckpointNotFoundError(
            f"Checkpoint {where!r} was deleted while it was being read (its "
            f"{METADATA_FILE} is gone; retention or another job removed it)"
        )
    if found < expected:
        raise CorruptCheckpointError(
            f"Array {name!r} in {where}: shape {list(meta.shape)} in chunks of "
            f"{list(meta.chunk_shape)} is a grid of {expected} chunks, but only {found} "
            f"chunk files exist: missing chunk files (damaged or crafted checkpoint)"
        )


def _chunks_read(meta: ArrayMetadata, reads: list) -> set[tuple[int, ...]] | None:
    """The chunk coordinates the slices ``reads`` touch; None when that is most of the
    array anyway (then the whole array is checked, as cheaply)."""
    out: set[tuple[int, ...]] = set()
    # Past a bound the listing is the cheaper check (its cost is the files that
    # exist), and a crafted grid must not make this process build a huge set.
    budget = min(chunk_total(meta), _LOCAL_CHECK_CHUNKS)
    for index in reads:
        spans = [range(s.start // c, -(-s.stop // c)) for s, c in zip(index, meta.chunk_shape,
                                                                     strict=True)]
        if math.prod(len(r) for r in spans) >= budget:
            return None
        out.update(itertools.product(*spans))
        if len(out) >= budget:
            return None
    return out


def _check_local_chunks(storage, name: str, meta: ArrayMetadata, where: str,
                        chunks: set[tuple[int, ...]]) -> None:
    """Each of ``chunks`` is a regular file, reached through plain directories."""
    root = os.path.join(storage.path, meta.storage_path)
    seen: set[str] = set()
    for chunk in sorted(chunks):
        parts = ["c", *map(str, chunk)]
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel in seen:
                continue
            path = os.path.join(root, rel)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not storage.exists(METADATA_FILE):
                    raise CheckpointNotFoundError(
                        f"Checkpoint {where!r} was deleted while it was being read (its "
                        f"{METADATA_FILE} is gone; retention or another job removed it)"
                    ) from None
                raise CorruptCheckpointError(
                    f"Array {name!r} in {where}: chunk file {rel} of its grid of "
                    f"{chunk_total(meta)} chunks is missing (damaged or crafted checkpoint)"
                ) from None
            last = depth == len(parts)
            if (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
                seen.add(rel)
                continue
            found = "a symbolic link" if stat.S_ISLNK(mode) else f"mode {stat.filemode(mode)}"
            raise CorruptCheckpointError(
                f"{path}: expected a regular {'file' if last else 'directory'}, found {found}"
            )
