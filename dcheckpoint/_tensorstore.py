"""Everything that knows TensorStore's and Zarr v3's spelling.

The engine hands this module an `ArrayMetadata` and a kvstore spec; it returns open
TensorStore arrays. Chunk I/O itself is ``array[index].write(...)`` / ``.read()``
futures, issued together so TensorStore's thread pool overlaps them.
"""

from __future__ import annotations

import json

import tensorstore as ts

from ._metadata import ArrayMetadata
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["zarr_spec", "open_for_write", "open_for_read", "translate_error", "group_node"]

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

    ``store_data_equal_to_fill_value`` makes every chunk a file, even an all-zero one,
    so that a missing chunk file is always an error on read, never silent zeros.
    """
    endian = {"configuration": {"endian": "little"}} if meta.dtype.itemsize > 1 else {}
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
            "codecs": [
                {"name": "bytes", **endian},
                *_COMPRESSION_CODECS[compression],
                {"name": "crc32c"},
            ],
        },
        "store_data_equal_to_fill_value": True,
    }


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
