"""Everything that knows TensorStore's and Zarr v3's spelling.

The engine hands this module an `ArrayMetadata` and a kvstore spec; it returns open
TensorStore arrays. Chunk I/O itself is ``array[index].write(...)`` / ``.read()``
futures, issued together so TensorStore's thread pool overlaps them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import tensorstore as ts

from ._metadata import ArrayMetadata
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["zarr_spec", "open_for_write", "open_for_read", "translate_error", "group_node",
           "inner_chunk_shape", "read_chunk_shape", "writable_view"]

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
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({
            "file_io_sync": True,
            "file_io_concurrency": {"limit": _FILE_IO_CONCURRENCY},
        })
    return _CONTEXT


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


def open_for_write(kvstore: dict, meta: ArrayMetadata, compression: str | None, *, create: bool):
    """Opens an array for writing; returns a future.

    ``create=False`` assumes the metadata without any I/O: every process can start
    writing its chunks at once, and only the coordinator writes ``zarr.json`` (with
    ``create=True``) when it commits.
    """
    spec = zarr_spec(kvstore, meta, compression)
    if create:
        return ts.open(spec, create=True, context=context())
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
