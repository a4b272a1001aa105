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
    "PYTHON_TYPES",
    "KEY_IMPLS",
]

METADATA_FILE = "dcheckpoint.json"
FORMAT_NAME = "dcheckpoint"
# 2: keys escape only "%", "/" and the empty key; storage names are hashed when not plain
# (docs/FORMAT.md, "Names"). Version 1 percent-encoded keys, so its paths mean other keys.
FORMAT_VERSION = 2
MAX_METADATA_BYTES = 256 * 1024 * 1024
_MAX_RANK = 32
# numpy must be able to hold any shape we accept, even a zero-size one it allocates
# whole: the product of the non-zero dimensions times the widest item (16 bytes) must
# stay below 2**63.
_MAX_ELEMENTS = 2**59

# Zarr v3 data_type names, equal to numpy's names. The ml_dtypes types (bfloat16, the
# float8s, float4_e2m1fn, int4, int2) are TensorStore's extensions; uint4 and uint2 are
# not among them (TensorStore 0.1.86 refuses them), so they cannot be saved.
_ML_DTYPES = (
    "bfloat16 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz "
    "float8_e4m3b11fnuz float8_e3m4 float8_e8m0fnu float4_e2m1fn int4 int2".split()
)
SUPPORTED_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 "
    "float16 float32 float64 complex64 complex128".split() + _ML_DTYPES
)
# What a saved array was in the user's tree when it was not an array (see _plan):
# a Python scalar or bytes (restored with that type onto host targets), or a typed
# PRNG key array (stored as its key data, rebuilt with this implementation).
PYTHON_TYPES = ("bool", "int", "float", "complex", "bytes")
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass(frozen=True)
class ArrayMetadata:
    """One saved array.

    Attributes:
      storage_path: Zarr array location relative to the checkpoint directory.
      shape: global shape.
      dtype: numpy dtype (bfloat16 through ml_dtypes).
      chunk_shape: Zarr chunk shape (the saved shard shape; 1 where a dim is 0).
      layout: the saved `mesh.Layout` as JSON, or None for host or non-mesh arrays.
      python_type: "int", "float", "bool", "complex" or "bytes" when the saved value was
        that Python type (a 0-d array, or uint8 bytes); None for arrays.
      key_impl: the PRNG implementation name when the value was a typed key array
        (``jax.random.key``); the stored array is its ``key_data``.
    """

    storage_path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    layout: dict | None = None
    python_type: str | None = None
    key_impl: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def chunk_grid(self) -> tuple[int, ...]:
        """Chunks along each dimension (0 along a zero-size one; () for a scalar)."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape, strict=True))


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """A committed checkpoint's metadata (see `decode_metadata`)."""

    arrays: dict[str, ArrayMetadata]
    object_graph: Any = None
    save_time: float = 0.0
    writer: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The caller's small JSON dict (``save(..., metadata=...)``); None when none was given.
    user_metadata: dict | None = None
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
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
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
                **_value_fields(a),
            }
            for path, a in meta.arrays.items()
        },
        "object_graph": meta.object_graph,
    }
    if meta.user_metadata is not None:
        body["user_metadata"] = meta.user_metadata
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


def _value_fields(a: ArrayMetadata) -> dict:
    """The optional fields of an array entry, present only when set (see FORMAT.md)."""
    fields = {"python_type": a.python_type, "key_impl": a.key_impl}
    return {k: v for k, v in fields.items() if v is not None}


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
        raise CorruptCheckpointError(f"{source}: {_version_problem(version)}")
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
    user_metadata = body.get("user_metadata")
    if user_metadata is not None and not isinstance(user_metadata, dict):
        raise CorruptCheckpointError(f"{source}: 'user_metadata' must be an object or absent")
    from ._packing import PackedTable  # (imports this module)

    return CheckpointMetadata(
        arrays=parsed,
        object_graph=body.get("object_graph"),
        save_time=float(save_time),
        writer=writer,
        format_version=version,
        user_metadata=user_metadata,
        packed=PackedTable.from_json(body.get("packed"), parsed, source=source),
    )


def _version_problem(version: object) -> str:
    """Why a checkpoint of another format version cannot be read, and what to do."""
    found = f"format version {version!r}, this dcheckpoint reads version {FORMAT_VERSION}"
    if type(version) is not int:
        return f"malformed {found}"
    if version > FORMAT_VERSION:
        return (f"unsupported {found}: it was written by a newer dcheckpoint; "
                "upgrade dcheckpoint to read it")
    return (f"unsupported {found}: it was written by an older dcheckpoint, whose array "
            "names are encoded differently; restore it with that release and save it "
            "again with this one")


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
    if math.prod(max(d, 1) for d in shape) > _MAX_ELEMENTS:
        raise CorruptCheckpointError(f"Array {path!r}: absurd shape {list(shape)}")
    # A saved chunk is a shard: never larger than the array (1 along an empty dim), so
    # a chunk can never ask a reader for more memory than the array itself.
    if any(c > max(s, 1) for s, c in zip(shape, chunk_shape, strict=True)):
        raise CorruptCheckpointError(
            f"Array {path!r}: chunk_shape {list(chunk_shape)} is larger than shape "
            f"{list(shape)}; expected each chunk dimension <= the array's (or 1 if 0)"
        )
    layout = entry.get("layout")
    if layout is not None and not isinstance(layout, dict):
        raise CorruptCheckpointError(f"Array {path!r}: layout must be an object or null")
    python_type, key_impl = entry.get("python_type"), entry.get("key_impl")
    if python_type is not None and (python_type not in PYTHON_TYPES or shape != ()
                                    and python_type != "bytes"):
        raise CorruptCheckpointError(
            f"Array {path!r}: python_type must be one of {PYTHON_TYPES} (a scalar unless "
            f"bytes), found {python_type!r} for shape {list(shape)}"
        )
    if key_impl is not None and (key_impl not in KEY_IMPLS or not shape):
        raise CorruptCheckpointError(
            f"Array {path!r}: key_impl must be one of {KEY_IMPLS}, found {key_impl!r}"
        )
    return ArrayMetadata(
        storage_path=check_storage_path(entry.get("storage_path"), array=path),
        shape=shape,
        dtype=dtype_from_name(entry.get("dtype"), array=path),
        chunk_shape=chunk_shape,
        layout=layout,
        python_type=python_type,
        key_impl=key_impl,
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
