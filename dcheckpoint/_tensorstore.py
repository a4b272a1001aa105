"""Everything that knows TensorStore's and Zarr v3's spelling.

The engine hands this module an `ArrayMetadata` and a kvstore spec; it returns open
TensorStore arrays. Chunk I/O itself is ``array[index].write(...)`` / ``.read()``
futures, issued together so TensorStore's thread pool overlaps them; `wait` and
`wait_all` are how the library waits on any of them: never without a bound.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time

import numpy as np
import tensorstore as ts

from ._env import number_from_env
from ._metadata import ArrayMetadata
from .errors import CheckpointError, CorruptCheckpointError, StorageTimeoutError

__all__ = ["zarr_spec", "open_for_write", "open_for_read", "translate_error", "group_node",
           "array_node", "write_files", "wait", "wait_all", "default_timeout_secs", "context",
           "inner_chunk_shape", "read_chunk_shape", "writable_view", "timed_out"]

# A JSON object of TensorStore context resources merged over this library's own, e.g.
# '{"s3_request_retries": {"max_retries": 8}, "s3_request_concurrency": {"limit": 64}}'.
CONTEXT_VARIABLE = "DCHECKPOINT_TENSORSTORE_CONTEXT"
# The storage wait bound of calls that take no CheckpointOptions (restore, readers, the
# manager's own state-file and retention I/O, the command line).
TIMEOUT_VARIABLE = "DCHECKPOINT_STORAGE_TIMEOUT_SECS"
DEFAULT_TIMEOUT_SECS = 600.0  # CheckpointOptions' default

_COMPRESSION_CODECS = {
    None: [],
    "zstd": [{"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
    "gzip": [{"name": "gzip", "configuration": {"level": 5}}],
    "blosc": [
        {
            "name": "blosc",
            "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle", "blocksize": 0},
        }
    ],
}

_CONTEXT = None
_FILE_IO_CONCURRENCY = 32  # concurrent blocking file calls (mostly waiting on the disk)


def context() -> ts.Context:
    """One shared context, so all arrays share TensorStore's I/O concurrency limits.

    A save or restore issues every chunk at once; TensorStore's default file I/O limit
    (about the core count) would let only a few blocking read/write+fsync calls run
    while the disk could take many, so the file limit is sized for I/O waits, not CPU.
    Object store drivers keep TensorStore's defaults (32 concurrent requests; transient
    errors retried with backoff from 1 s to 32 s); `CONTEXT_VARIABLE` overrides any of
    it. TensorStore has no per-request timeout: our waits are bounded instead.

    Raises:
      ValueError: `CONTEXT_VARIABLE` is not a JSON object of valid context resources.
    """
    global _CONTEXT
    if _CONTEXT is None:
        spec = {"file_io_sync": True, "file_io_concurrency": {"limit": _FILE_IO_CONCURRENCY}}
        extra = os.environ.get(CONTEXT_VARIABLE)
        try:
            spec.update(json.loads(extra) if extra else {})
            _CONTEXT = ts.Context(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{CONTEXT_VARIABLE}={extra!r}: expected a JSON object of TensorStore "
                f"context resources ({e})"
            ) from e
    return _CONTEXT


def default_timeout_secs() -> float:
    """The storage wait bound of calls without options: `TIMEOUT_VARIABLE`, else 600 s.

    Raises:
      ValueError: the variable is set but not a positive number of seconds.
    """
    return number_from_env(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_SECS,
                           valid=lambda secs: 0 < secs < math.inf,
                           expected="a positive number of seconds")


def wait(future, *, timeout_secs: float, what: str, abandon_under: str | None = None):
    """``future.result()``, given up after ``timeout_secs`` with a `StorageTimeoutError`.

    TensorStore retries transient errors by itself, but a server that accepts a request
    and never answers would block a plain ``result()`` for as long as it stalls.
    Giving up does not undo a write: TensorStore keeps retrying it even when cancelled,
    and a server may apply one it holds later. So a write given up on is remembered
    under ``abandon_under`` (the prefix or object it writes), and `settle_abandoned`
    makes a later write there wait for it first; anything else is cancelled.
    """
    return wait_all([future], timeout_secs=timeout_secs, what=what,
                    abandon_under=abandon_under)[0]


def wait_all(futures, *, timeout_secs: float, what: str,
             abandon_under: str | None = None) -> list:
    """Waits for every future; raises the first failure once all are done or given up.

    The bound is on progress, not on the total: while futures keep completing, a long
    save keeps going; once none has completed for ``timeout_secs``, the rest are given
    up at once (a stalled server fails the call in about ``timeout_secs``, not in
    ``timeout_secs`` per request). ``abandon_under``: see `wait`.
    """
    results, first_error, given_up = [], None, []
    deadline = time.monotonic() + timeout_secs
    for future in futures:
        try:
            results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            given_up.append(future)
            first_error = first_error or timed_out(what, timeout_secs)
            continue
        except Exception as e:  # noqa: BLE001 (the first one is raised below)
            first_error = first_error or e
        deadline = time.monotonic() + timeout_secs
    if given_up and abandon_under is not None:
        with _ABANDONED_LOCK:
            # Forget what has finished since (a local staging directory is never saved
            # into again, so nothing else would).
            for key in list(_ABANDONED):
                _ABANDONED[key] = [f for f in _ABANDONED[key] if not f.done()]
                if not _ABANDONED[key]:
                    del _ABANDONED[key]
            _ABANDONED.setdefault(abandon_under, []).extend(given_up)
    else:
        for future in given_up:
            future.cancel()
    if first_error is not None:
        raise first_error
    return results


# Writes this process gave up on, by the prefix or object they write (see `wait`).
_ABANDONED: dict[str, list] = {}
_ABANDONED_LOCK = threading.Lock()


def settle_abandoned(prefix: str, *, timeout_secs: float) -> None:
    """Before writing into ``prefix``: waits for writes given up on at or under it.

    Otherwise a write of a failed save, retried or released late, could overwrite what
    a new save wrote under the same name after it committed (a marker: old metadata
    over new chunks; the state file: an older list of checkpoints).

    Raises:
      StorageTimeoutError: they are still pending after ``timeout_secs``.
    """
    with _ABANDONED_LOCK:
        keys = [k for k in _ABANDONED if k == prefix or k.startswith(prefix + "/")]
        pending = [f for k in keys for f in _ABANDONED.pop(k)]
    deadline = time.monotonic() + timeout_secs
    for i, future in enumerate(pending):
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            with _ABANDONED_LOCK:
                _ABANDONED.setdefault(prefix, []).extend(pending[i:])
            raise StorageTimeoutError(
                f"{prefix}: {len(pending) - i} earlier writes here, given up on when "
                f"storage did not answer, are still pending after {timeout_secs:g} s; "
                "writing now could let them land on top of the new objects later "
                "(retry later, or save under another name)"
            ) from None
        except Exception:  # noqa: BLE001 (it failed for good: nothing can land)
            pass


def timed_out(what: str, timeout_secs: float) -> StorageTimeoutError:
    """The error of a storage wait given up after ``timeout_secs``; ``what`` names it."""
    return StorageTimeoutError(
        f"{what}: storage did not answer within {timeout_secs:g} s (the bound is "
        f"CheckpointOptions.timeout_secs for a save, {TIMEOUT_VARIABLE} otherwise): the "
        "server stalls, the network is down, or requests still fail after retries"
    )


def zarr_spec(kvstore: dict, meta: ArrayMetadata, compression: str | None) -> dict:
    """The Zarr v3 spec of one saved array.

    A saved shard is one chunk of the Zarr chunk grid, so one process writes each file.
    A shard bigger than ``_SHARD_ABOVE_BYTES`` is stored with Zarr v3's sharding codec:
    still one file, but made of inner chunks of about ``INNER_CHUNK_BYTES``, each with
    its own crc32c, so a restore reads a big shard in pieces in parallel and a target
    that needs part of a shard reads (and checksums) only the inner chunks it needs.

    ``store_data_equal_to_fill_value`` makes every chunk a file, even an all-zero one,
    so that a missing chunk file is always an error on read, never silent zeros.
    """
    endian = {"configuration": {"endian": "little"}} if meta.dtype.itemsize > 1 else {}
    codecs = [{"name": "bytes", **endian}, *_COMPRESSION_CODECS[compression],
              {"name": "crc32c"}]
    inner = inner_chunk_shape(meta.chunk_shape, meta.dtype.itemsize)
    if inner is not None:
        codecs = [{
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(inner),
                "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end",
            },
        }]
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(meta.shape),
            "data_type": meta.dtype.name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": list(meta.chunk_shape)},
            },
            "chunk_key_encoding": {"name": "default"},
            "codecs": codecs,
        },
        "store_data_equal_to_fill_value": True,
    }


INNER_CHUNK_BYTES = 8 << 20  # what one restore piece reads (and checksums) at once
_SHARD_ABOVE_BYTES = 16 << 20  # smaller shards stay one plain chunk
_MAX_INNER_CHUNKS = 1 << 16  # per shard; more would make the shard index the cost


def inner_chunk_shape(chunk_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """The inner chunks of a big shard, or None to store the shard as one plain chunk.

    Zarr requires inner chunks to divide the shard evenly. Dimensions are cut from the
    first (outermost) on, each to its largest divisor that keeps an inner chunk within
    ``INNER_CHUNK_BYTES``; so a (8192, 8192) float32 shard gets (256, 8192) chunks of
    8 MiB, each a contiguous run of the shard's bytes. Where only tiny inner chunks
    would divide the shard, it stays one chunk (read whole, as before sharding).
    """
    nbytes = math.prod(chunk_shape) * itemsize
    if nbytes <= _SHARD_ABOVE_BYTES:
        return None
    inner = list(chunk_shape)
    for d, extent in enumerate(chunk_shape):
        rest = math.prod(inner[d + 1:]) * itemsize  # bytes of one step along d
        if rest * extent <= INNER_CHUNK_BYTES:
            break
        fits = max(1, INNER_CHUNK_BYTES // rest)
        inner[d] = max(k for k in _divisors(extent) if k <= fits)
        if rest <= INNER_CHUNK_BYTES:
            break  # the next dimensions stay whole
    count = math.prod(c // i for c, i in zip(chunk_shape, inner, strict=True))
    too_small = math.prod(inner) * itemsize < INNER_CHUNK_BYTES // 16
    if count < 2 or count > _MAX_INNER_CHUNKS or too_small:
        return None  # e.g. a prime dimension: tiny inner chunks would cost more
    return tuple(inner)


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return small + [n // k for k in small]


def read_chunk_shape(array: ts.TensorStore, chunk_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The unit a read decodes: the inner chunk of a sharded array, else the chunk."""
    shape = array.chunk_layout.read_chunk.shape
    return chunk_shape if shape is None else tuple(shape)


def open_for_write(kvstore: dict, meta: ArrayMetadata, compression: str | None):
    """Opens an array for writing its chunks; returns a future.

    The metadata is assumed, without any I/O: every process can start writing its
    chunks at once, and only the coordinator writes ``zarr.json`` (`array_node`) when
    it commits.
    """
    spec = zarr_spec(kvstore, meta, compression)
    return ts.open(spec, open=True, assume_metadata=True, context=context())


def open_for_read(kvstore: dict, meta: ArrayMetadata):
    """Opens a saved array, checking its zarr.json against the checkpoint metadata."""
    spec = {
        "driver": "zarr3",
        "kvstore": kvstore,
        "fill_missing_data_reads": False,
        "schema": {"dtype": meta.dtype.name, "domain": {"shape": list(meta.shape)}},
    }
    return ts.open(spec, open=True, read=True, context=context())


def array_node(meta: ArrayMetadata, compression: str | None) -> bytes:
    """The bytes of an array's ``zarr.json``, exactly as TensorStore writes them.

    The coordinator writes these with a plain PUT rather than TensorStore's create,
    which is a create-if-absent: when its first response is lost and the request is
    retried, it finds its own object and fails with ALREADY_EXISTS. Nothing else writes
    a save's nodes (one writer per checkpoint), so the condition guards nothing and a
    plain write is idempotent. Rendered through an in-memory store, not by hand, so the
    node stays what any Zarr reader (and ``open_for_read``) expects.
    """
    spec = zarr_spec({"driver": "memory"}, meta, compression)
    store = ts.open(spec, create=True, context=ts.Context()).result()
    return store.kvstore.read("zarr.json").result().value


def write_files(kvstore: dict, files: dict[str, bytes], *, timeout_secs: float,
                what: str, abandon_under: str | None = None) -> None:
    """Writes small files ``{key: bytes}`` under ``kvstore`` concurrently, unconditionally.

    Each is one PUT on object stores (retrying one after a lost response rewrites the
    same bytes) and a write-to-temporary-and-rename in the file driver.
    """
    store = wait(ts.KvStore.open(kvstore, context=context()), timeout_secs=timeout_secs,
                 what=what)
    wait_all([store.write(key, data) for key, data in files.items()],
             timeout_secs=timeout_secs, what=what, abandon_under=abandon_under)


CPU_ALIGN = 64  # bytes; XLA's CPU client adopts (aliases) host buffers aligned to this


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose buffer starts on a `CPU_ALIGN` boundary: reads land
    in it (`writable_view`) and a CPU device adopts it without another copy."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + CPU_ALIGN, np.uint8)
    offset = -raw.ctypes.data % CPU_ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


_WRITES_INTO_NUMPY: bool | None = None


def writable_view(buffer: np.ndarray) -> ts.TensorStore | None:
    """A TensorStore whose writes land in ``buffer``, so a read from a stored array goes
    straight into it; None where this TensorStore cannot reference numpy memory
    (checked once, by writing through a view), and the caller reads into a new array
    and copies."""
    global _WRITES_INTO_NUMPY
    if _WRITES_INTO_NUMPY is None:
        probe = np.zeros(2, np.uint8)
        try:
            ts.array(probe, copy=False, write=True)[1:].write(np.ones(1, np.uint8)).result()
            _WRITES_INTO_NUMPY = bool(probe[1] == 1)
        except (TypeError, ValueError, AttributeError):
            _WRITES_INTO_NUMPY = False
    return ts.array(buffer, copy=False, write=True) if _WRITES_INTO_NUMPY else None


def group_node() -> bytes:
    """A Zarr v3 group's zarr.json, so Zarr tools can walk the checkpoint's tree."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


def translate_error(e: Exception, *, array: str, where: str) -> CheckpointError:
    """Maps a TensorStore error to this library's errors, naming the array."""
    text = str(e)
    if "Digest mismatch" in text or "DATA_LOSS" in text or "checksum" in text.lower():
        return CorruptCheckpointError(
            f"Array {array!r} in {where}: a chunk failed its crc32c checksum ({text})"
        )
    if "is missing" in text or "NOT_FOUND" in text:
        return CorruptCheckpointError(f"Array {array!r} in {where}: missing data ({text})")
    if "FAILED_PRECONDITION" in text or "Error opening" in text:
        return CorruptCheckpointError(
            f"Array {array!r} in {where}: the stored Zarr array does not match the "
            f"checkpoint metadata or is unreadable ({text})"
        )
    return CheckpointError(f"Array {array!r} in {where}: {text}")
