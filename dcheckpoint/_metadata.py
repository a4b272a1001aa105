"""The metadata file: the commit marker and the table of contents of a checkpoint.

JSON only, never executed or unpickled. The coordinator writes it last; a directory
without it is not a checkpoint. Its body carries a SHA-256 so a flipped byte in the
file is caught, and every field is validated on read because a checkpoint may come
from anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

import numpy as np

from ._paths import check_storage_path
from .errors import CorruptCheckpointError

__all__ = [
    "METADATA_FILE",
    "FORMAT_VERSION",
    "ArrayMetadata",
    "CheckpointMetadata",
    "encode_metadata",
    "decode_metadata",
    "SUPPORTED_DTYPES",
]

METADATA_FILE = "dcheckpoint.json"
FORMAT_NAME = "dcheckpoint"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 256 * 1024 * 1024
_MAX_RANK = 32
_MAX_ELEMENTS = 2**62

# Zarr v3 data_type names (bfloat16 is TensorStore's extension), equal to numpy's names.
SUPPORTED_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 bfloat16 float32 float64 complex64 complex128".split()
)


@dataclasses.dataclass(frozen=True)
class ArrayMetadata:
    """One saved array.

    Attributes:
      storage_path: Zarr array location relative to the checkpoint directory.
      shape: global shape.
      dtype: numpy dtype (bfloat16 through ml_dtypes).
      chunk_shape: Zarr chunk shape (the saved shard shape; 1 where a dim is 0).
      layout: the saved `mesh.Layout` as JSON, or None for host or non-mesh arrays.
    """

    storage_path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    layout: dict | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """A committed checkpoint's metadata (see `decode_metadata`)."""

    arrays: dict[str, ArrayMetadata]
    object_graph: Any = None
    save_time: float = 0.0
    writer: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    packed: Any = None  # dcheckpoint._packing.PackedTable, or None: nothing packed


@functools.cache
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy computes it in Python (several microseconds), and a
    save of 50,000 arrays asked for it 200,000 times."""
    return dtype.name


def dtype_from_name(name: object, *, array: str) -> np.dtype:
    if not isinstance(name, str) or name not in SUPPORTED_DTYPES:  # lists: unhashable
        raise CorruptCheckpointError(
            f"Array {array!r}: unsupported dtype {name!r}; expected one of "
            f"{sorted(SUPPORTED_DTYPES)}"
        )
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def encode_metadata(meta: CheckpointMetadata) -> bytes:
    body = {
        "save_time": meta.save_time,
        "writer": meta.writer,
        "arrays": {
            path: {
                "storage_path": a.storage_path,
                "shape": list(a.shape),
                "dtype": dtype_name(a.dtype),
                "chunk_shape": list(a.chunk_shape),
                "layout": a.layout,
            }
            for path, a in meta.arrays.items()
        },
        "object_graph": meta.object_graph,
    }
    if meta.packed is not None:
        body["packed"] = meta.packed.to_json()
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sha256": _digest(body),
        "checkpoint": body,
    }
    return _readable_json(doc).encode()


def _readable_json(value, depth: int = 0) -> str:
    """JSON with one line per array (or node), fast for 100,000 arrays.

    ``json.dumps(indent=...)`` runs Python's encoder over every value; here the
    outer levels and large maps are laid out one entry per line, and each entry is
    one call of the C encoder. The digest does not depend on the layout.
    """
    if not isinstance(value, dict) or not value or (depth >= 3 and len(value) <= 16):
        return json.dumps(value, sort_keys=True)
    pad = " " * (depth + 1)
    items = (f"{pad}{json.dumps(k)}: {_readable_json(value[k], depth + 1)}"
             for k in sorted(value))
    return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"


def decode_metadata(data: bytes, *, source: str) -> CheckpointMetadata:
    """Parses and validates a metadata file.

    Raises:
      CorruptCheckpointError: not JSON, wrong format or version, checksum mismatch, or
        a field outside what this format allows; the message names ``source``.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{source}: metadata is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{source}: not a dcheckpoint metadata file")
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # True == 1 in Python
        raise CorruptCheckpointError(
            f"{source}: unknown format version {version!r}; this library reads "
            f"version {FORMAT_VERSION}"
        )
    body = doc.get("checkpoint")
    if not isinstance(body, dict) or doc.get("sha256") != _digest(body):
        raise CorruptCheckpointError(
            f"{source}: metadata checksum mismatch (expected {doc.get('sha256')!r}); "
            "the file was modified or damaged"
        )
    arrays = body.get("arrays")
    if not isinstance(arrays, dict):
        raise CorruptCheckpointError(f"{source}: 'arrays' must be an object")
    parsed = {path: _array_from_json(path, entry) for path, entry in arrays.items()}
    storage_paths = [a.storage_path for a in parsed.values()]
    if len(set(storage_paths)) != len(storage_paths):
        raise CorruptCheckpointError(f"{source}: two arrays share one storage path")
    save_time = body.get("save_time", 0.0)
    writer = body.get("writer", {})
    if not isinstance(save_time, (int, float)) or not isinstance(writer, dict):
        raise CorruptCheckpointError(f"{source}: malformed 'save_time' or 'writer'")
    from ._packing import PackedTable  # (imports this module)

    return CheckpointMetadata(
        arrays=parsed,
        object_graph=body.get("object_graph"),
        save_time=float(save_time),
        writer=writer,
        format_version=version,
        packed=PackedTable.from_json(body.get("packed"), parsed, source=source),
    )


def _array_from_json(path: object, entry: object) -> ArrayMetadata:
    if not isinstance(path, str) or not isinstance(entry, dict):
        raise CorruptCheckpointError(f"Array {path!r}: malformed metadata entry")
    shape = _int_tuple(entry.get("shape"), array=path, field="shape", minimum=0)
    chunk_shape = _int_tuple(entry.get("chunk_shape"), array=path, field="chunk_shape", minimum=1)
    if len(shape) > _MAX_RANK or len(chunk_shape) != len(shape):
        raise CorruptCheckpointError(
            f"Array {path!r}: shape {list(shape)} and chunk_shape {list(chunk_shape)} must "
            f"have the same rank, at most {_MAX_RANK}"
        )
    if math.prod(shape) > _MAX_ELEMENTS:
        raise CorruptCheckpointError(f"Array {path!r}: absurd shape {list(shape)}")
    layout = entry.get("layout")
    if layout is not None and not isinstance(layout, dict):
        raise CorruptCheckpointError(f"Array {path!r}: layout must be an object or null")
    return ArrayMetadata(
        storage_path=check_storage_path(entry.get("storage_path"), array=path),
        shape=shape,
        dtype=dtype_from_name(entry.get("dtype"), array=path),
        chunk_shape=chunk_shape,
        layout=layout,
    )


def _int_tuple(value: object, *, array: str, field: str, minimum: int) -> tuple[int, ...]:
    ok = isinstance(value, list) and all(
        type(v) is int and minimum <= v < 2**62 for v in value
    )
    if not ok:
        raise CorruptCheckpointError(
            f"Array {array!r}: {field} must be a list of integers >= {minimum}, found {value!r}"
        )
    return tuple(value)


def _digest(body: object) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
