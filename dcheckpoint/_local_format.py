"""The local tier's files: one step directory per step, raw pieces with checksums.

```
<local directory>/step-<N>/
  metadata.json   the step's CheckpointMetadata (the persistent format's file)
  own.json        [{key, file, nbytes, checksum, value}] of this process's pieces
  own/<i>.bin     the raw bytes of piece i, C order
  peer.json       the same for the copies kept for peers (``source_processes``)
  peer/<i>.bin
  COMMITTED       {step, process_count, save, time}: written last, after the commit
```

A piece is named by its array path and global bounds (`piece_key`), never by the
process that wrote it, so any process of any later job can use it. Nothing here
talks to other processes (`_local_tier` runs the protocol).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import mmap
import os
import zlib
from typing import Any

import numpy as np

__all__ = ["STEP_PREFIX", "COMMITTED", "METADATA", "KINDS", "IO_THREADS", "piece_key",
           "bounds_of", "step_of", "checksum", "verify", "write_atomic", "read_json",
           "read_bytes", "write_copies", "map_piece", "describe_local_directory"]

try:  # 3-4x faster than zlib's crc32 where installed (zarr brings it)
    import google_crc32c as _crc32c
except ImportError:  # pragma: no cover
    _crc32c = None


STEP_PREFIX = "step-"
COMMITTED = "COMMITTED"
METADATA = "metadata.json"
KINDS = ("own", "peer")
IO_THREADS = 4  # file writes and reads of one process at once


def checksum(buffer: np.ndarray) -> tuple[str, int]:
    data = buffer.reshape(-1).view(np.uint8)
    if _crc32c is not None:
        return "crc32c", _crc32c.value(data)
    return "crc32", zlib.crc32(data)


def verify(buffer: np.ndarray, algorithm: str, expected: int) -> bool:
    data = buffer.reshape(-1).view(np.uint8)
    if algorithm == "crc32c" and _crc32c is not None:
        return _crc32c.value(data) == expected
    if algorithm == "crc32":
        return zlib.crc32(data) == expected
    return False  # a checksum this process cannot compute: never trust the copy


def piece_key(path: str, index) -> str:
    """The global name of a piece: its array path and global bounds (JSON)."""
    return json.dumps([path, [[s.start, s.stop] for s in index]])


def bounds_of(key: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    path, bounds = json.loads(key)
    return path, tuple((int(a), int(b)) for a, b in bounds)


def step_of(name: str) -> int | None:
    digits = name[len(STEP_PREFIX):]
    if name.startswith(STEP_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def write_atomic(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_copies(where: str, copies: list[tuple[str, list, list[int] | None]]) -> None:
    """Writes each (kind, [(key, bytes)], source processes) as ``<kind>/<i>.bin`` files,
    all on one pool, then each kind's index ``<kind>.json``."""
    for kind, _, _ in copies:
        os.makedirs(os.path.join(where, kind), exist_ok=True)

    def write(job):
        kind, i, key, data = job
        flat = data.reshape(-1).view(np.uint8)
        algorithm, value = checksum(flat)
        with open(os.path.join(where, kind, f"{i}.bin"), "wb") as f:
            f.write(memoryview(flat))
        return kind, {"key": key, "file": f"{kind}/{i}.bin", "nbytes": int(flat.nbytes),
                      "checksum": algorithm, "value": value}

    jobs = [(kind, i, key, data) for kind, pieces, _ in copies
            for i, (key, data) in enumerate(pieces)]
    with cf.ThreadPoolExecutor(IO_THREADS) as pool:
        written = list(pool.map(write, jobs))
    for kind, _, source in copies:
        entries = [entry for k, entry in written if k == kind]
        write_atomic(os.path.join(where, f"{kind}.json"),
                      json.dumps({"source_processes": source, "pieces": entries}).encode())


def map_piece(path: str, nbytes: int) -> np.ndarray | None:
    """The bytes of a piece file, mapped copy-on-write (None: not ``nbytes`` long).

    On tmpfs the mapping is the page cache itself, so a piece is read without a copy,
    and a CPU device adopts it as its buffer; private pages keep the file unchanged
    if a jitted step later donates and overwrites that buffer. Elsewhere (an
    accelerator) the host-to-device copy reads the mapping directly.
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != nbytes:
            return None
        # No MAP_POPULATE: on a private writable mapping it write-faults every page,
        # i.e. copies the whole file (3x slower than mapping pages on first read).
        mapped = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(mapped, np.uint8)


def describe_local_directory(directory: str) -> list[dict]:
    """What one process's local directory holds, step by step (for ``dcheckpoint ls``)."""
    rows = []
    for name in sorted(os.listdir(directory), key=lambda n: step_of(n) or -1):
        step = step_of(name)
        if step is None:
            continue
        where = os.path.join(directory, name)
        row: dict[str, Any] = {"step": step, "path": where, "committed": False}
        try:
            marker = read_json(os.path.join(where, COMMITTED))
            row.update(committed=True, save=marker.get("save"), time=marker.get("time"))
        except (OSError, ValueError):
            pass
        for kind in KINDS:
            try:
                entries = read_json(os.path.join(where, f"{kind}.json"))["pieces"]
                row[kind] = {"pieces": len(entries),
                             "bytes": sum(e["nbytes"] for e in entries)}
            except (OSError, ValueError, KeyError):
                row[kind] = None
        rows.append(row)
    return rows
