"""Pure save and restore plans: which slices this process writes or reads.

Plans are frozen dataclasses built from array shardings; nothing here touches storage
(the engine executes plans). The distributed rule that makes every element written
exactly once lives here: a process writes only the shards JAX numbers ``replica_id ==
0``, and each saved chunk is exactly one such shard.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mesh import Layout

from ._gc import paused as _gc_paused
from ._metadata import SUPPORTED_DTYPES, ArrayMetadata, dtype_name
from ._paths import to_storage_path
from .errors import CheckpointMismatchError

__all__ = ["WriteItem", "SavePlan", "ReadItem", "plan_save", "plan_read", "normalize_index"]

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class WriteItem:
    """One chunk this process writes.

    Attributes:
      path: logical array path.
      index: the global slice the chunk covers (explicit start/stop per dimension).
      chunk: the chunk's coordinate in the Zarr chunk grid.
      data: the shard's value (a jax.Array until snapshotted, then a numpy array).
    """

    path: str
    index: Index
    chunk: tuple[int, ...]
    data: Any = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class SavePlan:
    """Every array of a save (same on all processes) and this process's writes."""

    arrays: dict[str, ArrayMetadata]
    writes: tuple[WriteItem, ...]


@dataclasses.dataclass(frozen=True)
class ReadItem:
    """One slice this process reads, then places on ``devices`` (none: host numpy)."""

    path: str
    index: Index
    devices: tuple[jax.Device, ...]


def normalize_index(index: tuple, shape: tuple[int, ...]) -> Index:
    return tuple(
        slice(s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(index)
    )


@_gc_paused
def plan_save(arrays: Mapping[str, Any], *, is_coordinator: bool) -> SavePlan:
    """Plans a save of ``{logical path: array}``.

    jax.Arrays contribute the shards this process holds as replica 0; host values
    (numpy arrays, Python scalars) are one chunk written by the coordinator alone. So
    is a jax.Array that lives only on this process's devices in a multi-process job:
    every process holds its own copy, and the coordinator's copy is the one saved.

    Raises:
      ValueError: a path is malformed or a dtype cannot be stored.
    """
    metas: dict[str, ArrayMetadata] = {}
    writes: list[WriteItem] = []
    for path, value in arrays.items():
        if isinstance(value, jax.Array) and not _is_process_local(value):
            meta, items = _plan_jax_array(path, value)
        else:
            meta, items = _plan_host_value(path, value, is_coordinator)
        metas[path] = meta
        writes.extend(items)
    return SavePlan(arrays=metas, writes=tuple(writes))


def _is_process_local(value: jax.Array) -> bool:
    return jax.process_count() > 1 and value.is_fully_addressable


def _array_metadata(path: str, shape, dtype, shard_shape, layout) -> ArrayMetadata:
    dtype = np.dtype(dtype)
    if dtype_name(dtype) not in SUPPORTED_DTYPES:
        raise ValueError(
            f"Array {path!r}: dtype {dtype.name} cannot be saved; expected one of "
            f"{sorted(SUPPORTED_DTYPES)}"
        )
    return ArrayMetadata(
        storage_path=to_storage_path(path),
        shape=tuple(shape),
        dtype=dtype,
        # Zarr chunk dimensions must be >= 1; a zero-size dimension has no chunks anyway.
        chunk_shape=tuple(max(1, d) for d in shard_shape),
        layout=layout,
    )


def _plan_jax_array(path: str, value: jax.Array) -> tuple[ArrayMetadata, list[WriteItem]]:
    sharding = value.sharding
    layout = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        try:
            layout = Layout.from_sharding(sharding, value.ndim).to_json()
        except (TypeError, ValueError):
            pass  # the saved layout is informational (restore uses the target's own)
    meta = _array_metadata(
        path, value.shape, value.dtype, sharding.shard_shape(value.shape), layout
    )
    items = []
    if math.prod(value.shape) == 0:
        return meta, items  # a zero-size array has no chunks
    for shard in value.addressable_shards:
        if shard.replica_id != 0:
            continue  # another device holds the same slice as replica 0 and writes it
        index = normalize_index(shard.index, value.shape)
        chunk = tuple(s.start // c for s, c in zip(index, meta.chunk_shape, strict=True))
        items.append(WriteItem(path=path, index=index, chunk=chunk, data=shard.data))
    return meta, items


def _plan_host_value(path: str, value: Any, is_coordinator: bool):
    array = np.asarray(value)
    meta = _array_metadata(path, array.shape, array.dtype, array.shape, None)
    if not is_coordinator or array.size == 0:
        return meta, []
    index = tuple(slice(0, d) for d in array.shape)
    return meta, [WriteItem(path=path, index=index, chunk=(0,) * array.ndim, data=array)]


def plan_read(path: str, meta: ArrayMetadata, target: Any) -> tuple[Any, list[ReadItem]]:
    """Plans the reads of one array for ``target``; returns (sharding or None, reads).

    Devices that need the same slice share one read.

    Raises:
      CheckpointMismatchError: ``target`` expects another shape or dtype.
    """
    sharding, shape, dtype = _target_spec(target)
    if shape is not None and tuple(shape) != meta.shape:
        raise CheckpointMismatchError(
            f"Array {path!r}: restore target has shape {tuple(shape)}, the checkpoint "
            f"holds shape {meta.shape}"
        )
    if dtype is not None and np.dtype(dtype) != meta.dtype:
        raise CheckpointMismatchError(
            f"Array {path!r}: restore target has dtype {np.dtype(dtype).name}, the "
            f"checkpoint holds {meta.dtype.name}"
        )
    if sharding is None:
        return None, [ReadItem(path, tuple(slice(0, d) for d in meta.shape), ())]
    # Slices are not hashable before Python 3.12: group by (start, stop) pairs.
    by_bounds: dict[tuple, tuple[Index, list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(meta.shape).items():
        index = normalize_index(index, meta.shape)
        bounds = tuple((s.start, s.stop) for s in index)
        by_bounds.setdefault(bounds, (index, []))[1].append(device)
    return sharding, [ReadItem(path, idx, tuple(devs)) for idx, devs in by_bounds.values()]


def _target_spec(target: Any):
    """(sharding or None, expected shape or None, expected dtype or None)."""
    if target is None:
        return None, None, None
    if isinstance(target, jax.sharding.Sharding):
        return target, None, None
    if isinstance(target, jax.Array):
        return target.sharding, target.shape, target.dtype
    if isinstance(target, jax.ShapeDtypeStruct):
        return target.sharding, target.shape, target.dtype
    if isinstance(target, np.ndarray):
        return None, target.shape, target.dtype
    raise TypeError(
        "A restore target must be a jax.sharding.Sharding, jax.ShapeDtypeStruct, "
        f"jax.Array, numpy array or None; found {type(target).__name__}"
    )
