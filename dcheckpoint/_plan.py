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
import jax.numpy as jnp
import numpy as np

from mesh import Layout

from ._gc import paused as _gc_paused
from ._metadata import SUPPORTED_DTYPES, ArrayMetadata, dtype_name
from ._paths import storage_paths, to_storage_path
from .errors import CheckpointMismatchError, CoordinationError

__all__ = ["WriteItem", "SavePlan", "ReadItem", "ProcessValue", "plan_save", "plan_read",
           "finish_read", "normalize_index", "is_key_array", "python_type"]

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
class ProcessValue:
    """A JSON value that differs per process (a data iterator's position).

    It is not an array: each process's value travels in its save manifest and the
    coordinator records them all, by process index, in the object graph.
    """

    value: Any


@dataclasses.dataclass(frozen=True)
class SavePlan:
    """Every array of a save (same on all processes) and this process's writes.

    ``process_values`` holds this process's ``ProcessValue``s by path (differing
    per process, so not part of the array table that processes compare).
    """

    arrays: dict[str, ArrayMetadata]
    writes: tuple[WriteItem, ...]
    process_values: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    A typed PRNG key array is saved as its ``key_data`` (same sharding, one more
    dimension) with its implementation's name; a Python scalar or bytes value as a
    0-d (uint8) array with its Python type, so both come back as they went in.
    ``ProcessValue``s go to ``SavePlan.process_values``.

    Raises:
      ValueError: a path is malformed or a dtype cannot be stored.
    """
    metas: dict[str, ArrayMetadata] = {}
    writes: list[WriteItem] = []
    process_values: dict[str, Any] = {}
    for path, value in arrays.items():
        if isinstance(value, ProcessValue):
            process_values[path] = value.value
            continue
        key_impl = None
        if is_key_array(value):
            key_impl = str(jax.random.key_impl(value))
            value = jax.random.key_data(value)
        if isinstance(value, jax.Array) and not _is_process_local(value):
            meta, items = _plan_jax_array(path, value)
        else:
            meta, items = _plan_host_value(path, value, is_coordinator)
        if key_impl is not None:
            meta = dataclasses.replace(meta, key_impl=key_impl)
        metas[path] = meta
        writes.extend(items)
    # Storage names are chosen once for the whole save: siblings that differ only in
    # case must not share a directory on a case-insensitive file system.
    stored = storage_paths(metas)
    metas = {p: dataclasses.replace(m, storage_path=stored[p]) for p, m in metas.items()}
    return SavePlan(arrays=metas, writes=tuple(writes), process_values=process_values)


def is_key_array(value: Any) -> bool:
    """Whether ``value`` is a typed PRNG key array (``jax.random.key``)."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def key_impl_name(value: Any) -> str:
    """The PRNG implementation name of a typed key array or its ``ShapeDtypeStruct``.

    ``jax.random.key_impl`` takes only concrete keys; an abstract target from
    ``jax.eval_shape`` carries the implementation in its key dtype alone.
    """
    if isinstance(value, jax.Array):
        return str(jax.random.key_impl(value))
    return str(value.dtype._impl.name)  # jax has no public accessor for the dtype's impl


def key_struct(data: Any, impl: str, sharding: Any = None) -> jax.ShapeDtypeStruct:
    """The abstract key array whose key data is shaped like ``data`` (shape, dtype)."""
    keys = jax.eval_shape(lambda d: jax.random.wrap_key_data(d, impl=impl),
                          jax.ShapeDtypeStruct(data.shape, data.dtype))
    return jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding)


def python_type(value: Any) -> str | None:
    """The recorded Python type of a scalar or bytes value; None for anything else."""
    for t in (bool, int, float, complex, bytes):  # bool first: True is an int too
        if type(value) is t:
            return t.__name__
    return None


def _is_process_local(value: jax.Array) -> bool:
    return jax.process_count() > 1 and value.is_fully_addressable


def _array_metadata(path: str, shape, dtype, shard_shape, layout) -> ArrayMetadata:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype_name(dtype) not in SUPPORTED_DTYPES:
        found = "a value of no numpy dtype" if dtype is None else f"dtype {dtype.name}"
        raise ValueError(
            f"Array {path!r}: {found} cannot be saved; supported dtypes are "
            f"{sorted(SUPPORTED_DTYPES)}, Python scalars, bytes and typed PRNG keys. "
            f"Convert it (e.g. uint4 -> uint8 with .astype) or leave it out of the checkpoint"
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
    kind = python_type(value)
    if isinstance(value, jax.ShapeDtypeStruct):
        raise ValueError(
            f"Array {path!r}: a jax.ShapeDtypeStruct is an abstract placeholder (a restore "
            "target), not a value; restore the checkpoint into it before saving, or save "
            "the concrete arrays"
        )
    if kind is None and not isinstance(value, np.ndarray | np.generic | jax.Array):
        raise ValueError(
            f"Array {path!r}: a {type(value).__name__} is not an array; arrays, Python "
            "scalars, bytes and PRNG keys are stored as arrays (a Checkpoint also keeps "
            "strings and None, in its object graph)"
        )
    array = np.frombuffer(value, np.uint8) if kind == "bytes" else np.asarray(value)
    if kind == "int" and array.dtype == object:
        raise ValueError(
            f"Array {path!r}: the Python int {value} does not fit in 64 bits; save it as a "
            "string or split it"
        )
    meta = _array_metadata(path, array.shape, array.dtype, array.shape, None)
    if kind is not None:
        # The coordinator writes it once, as any host value; the type is in the metadata.
        meta = dataclasses.replace(meta, python_type=kind)
    if not is_coordinator or array.size == 0:
        return meta, []
    index = tuple(slice(0, d) for d in array.shape)
    return meta, [WriteItem(path=path, index=index, chunk=(0,) * array.ndim, data=array)]


def plan_read(path: str, meta: ArrayMetadata, target: Any) -> tuple[Any, list[ReadItem]]:
    """Plans the reads of one array for ``target``; returns (sharding or None, reads).

    Devices that need the same slice share one read. A typed PRNG key target is
    compared through its key data (what is stored); ``finish_read`` rebuilds the keys.

    Raises:
      CheckpointMismatchError: ``target`` expects another shape or dtype.
    """
    if meta.python_type not in (None, "bytes") and _of_python_scalar(target):
        target = None  # eval_shape of a Python scalar: the scalar comes back, as saved
    if meta.key_impl is not None or is_key_array(target):
        target = _key_data_target(path, meta, target)
    sharding, shape, dtype = _target_spec(path, target)
    if shape is not None and tuple(shape) != meta.shape:
        raise CheckpointMismatchError(
            f"Array {path!r}: restore target has shape {tuple(shape)}, the checkpoint "
            f"holds shape {meta.shape}"
        )
    if dtype is not None and np.dtype(dtype) != meta.dtype:
        raise CheckpointMismatchError(
            f"Array {path!r}: restore target has dtype {np.dtype(dtype).name}, the "
            f"checkpoint holds {meta.dtype.name} (cast_dtypes=True casts on restore)"
        )
    whole = tuple(slice(0, d) for d in meta.shape)
    if sharding is None:
        return None, [ReadItem(path, whole, ())]
    if sharding.is_fully_replicated:  # the common small case, without a per-device walk
        devices = tuple(sorted(sharding.addressable_devices, key=lambda d: d.id))
        return sharding, [ReadItem(path, whole, devices)] if devices else []
    # Slices are not hashable before Python 3.12: group by (start, stop) pairs.
    by_bounds: dict[tuple, tuple[Index, list[jax.Device]]] = {}
    for device, index in sharding.addressable_devices_indices_map(meta.shape).items():
        index = normalize_index(index, meta.shape)
        bounds = tuple((s.start, s.stop) for s in index)
        by_bounds.setdefault(bounds, (index, []))[1].append(device)
    return sharding, [ReadItem(path, idx, tuple(devs)) for idx, devs in by_bounds.values()]


def finish_read(meta: ArrayMetadata, target: Any, sharding: Any, array: Any) -> Any:
    """What the user gets for a read ``array``: keys rebuilt, Python types restored.

    A Python scalar (or bytes) comes back as that Python type when read onto the host
    (no sharding); a target with a sharding asked for an array, and gets one. A
    ``jax.ShapeDtypeStruct`` without a sharding (``jax.eval_shape``'s output) stands
    for what the abstracted function returns: an uncommitted ``jax.Array`` on the
    default device, never host numpy.
    """
    if meta.key_impl is not None:
        return jax.random.wrap_key_data(array, impl=meta.key_impl)
    if sharding is None and isinstance(target, jax.ShapeDtypeStruct):
        return jnp.asarray(array)
    if sharding is None and meta.python_type is not None:
        if meta.python_type == "bytes":
            return np.asarray(array, np.uint8).tobytes()
        return {"bool": bool, "int": int, "float": float, "complex": complex}[
            meta.python_type](np.asarray(array)[()])
    return array


def _key_data_target(path: str, meta: ArrayMetadata, target: Any) -> Any:
    """The target of a key array's stored data, from a target for the keys themselves."""
    if not is_key_array(target):
        if meta.key_impl is not None and target is not None and not isinstance(
            target, jax.sharding.Sharding
        ):
            raise CheckpointMismatchError(
                f"Array {path!r}: the checkpoint holds {meta.key_impl} PRNG keys, the "
                f"restore target is a {getattr(target, 'dtype', type(target).__name__)} value"
            )
        return target  # a sharding applies to the key data as it is (one more dim)
    impl = key_impl_name(target)
    if meta.key_impl != impl:
        found = f"{meta.key_impl} PRNG keys" if meta.key_impl else f"dtype {meta.dtype.name}"
        raise CheckpointMismatchError(
            f"Array {path!r}: the restore target holds {impl} PRNG keys, the checkpoint "
            f"holds {found}"
        )
    data = jax.eval_shape(jax.random.key_data, target)
    # A key array's sharding also lays out its data (the extra dims are unsharded).
    sharding = getattr(target, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _concrete(path: str, sharding: Any) -> Any:
    """A sharding that places data on devices.

    ``jax.eval_shape`` under explicit mesh axes gives shardings over an
    ``AbstractMesh`` (axis names and sizes, no devices); the mesh set with
    ``jax.set_mesh`` is the one such a target means, when it has that shape.
    """
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.AbstractMesh):
        return sharding
    current = jax.sharding.get_mesh()
    if not current.empty and current.abstract_mesh == mesh:
        return jax.sharding.NamedSharding(current, sharding.spec,
                                          memory_kind=sharding.memory_kind)
    raise CheckpointMismatchError(
        f"Array {path!r}: the restore target's sharding is on an abstract mesh "
        f"{dict(mesh.shape)} (jax.eval_shape's output under explicit axes), which names no "
        "devices; restore inside `with jax.set_mesh(mesh):` for a mesh of that shape, or "
        "give the target concrete shardings (jax.sharding.NamedSharding(mesh, spec))"
    )


def is_numeric(dtype) -> bool:
    """Whether ``dtype`` holds numbers (bool included) that an opt-in cast may convert;
    bfloat16 and the float8s count, though numpy calls their kind "V"."""
    return bool(jax.dtypes.issubdtype(dtype, np.number) or np.dtype(dtype) == np.bool_)


def _of_python_scalar(target: Any) -> bool:
    """Whether ``target`` is what ``jax.eval_shape`` makes of a Python scalar.

    Its dtype (weakly typed int32/float32) is JAX's default, not the user's choice, so
    it must not turn away the int or float that the concrete state held and saved.
    """
    return (isinstance(target, jax.ShapeDtypeStruct) and target.shape == ()
            and getattr(target, "weak_type", False))


def _target_spec(path: str, target: Any):
    """(sharding or None, expected shape or None, expected dtype or None)."""
    if target is None or python_type(target) is not None:
        return None, None, None  # a Python scalar target: whatever was saved, on the host
    if isinstance(target, jax.sharding.Sharding):
        return target, None, None
    if isinstance(target, jax.Array):
        return target.sharding, target.shape, target.dtype
    if isinstance(target, jax.ShapeDtypeStruct):
        return _concrete(path, target.sharding), target.shape, target.dtype
    if isinstance(target, np.ndarray | np.generic):
        return None, target.shape, target.dtype
    raise TypeError(
        "A restore target must be a jax.sharding.Sharding, jax.ShapeDtypeStruct, "
        f"jax.Array, numpy array or None; found {type(target).__name__}"
    )


def record_process_values(object_graph: Any, reports: list[dict]) -> Any:
    """(coordinator) Puts every process's ``ProcessValue``s into the object graph.

    ``reports`` are the gathered save manifests; each carries its process's values in
    ``"values"`` ``{path: value}``. The graph node at each path gets ``"states"``: the
    values by process index. A process that did not report a path saved another
    object graph than the coordinator, which is refused like a different array table.

    Raises:
      CoordinationError: the processes disagree on which paths hold per-process values.
    """
    paths = sorted({p for r in reports for p in r.get("values", {})})
    if not paths:
        return object_graph
    by_process = sorted(reports, key=lambda r: r["process"])
    nodes = object_graph.get("nodes", {}) if isinstance(object_graph, dict) else {}
    graph = {**object_graph, "nodes": dict(nodes)}
    for path in paths:
        lacking = [r["process"] for r in by_process if path not in r.get("values", {})]
        if lacking or path not in nodes:
            raise CoordinationError(
                f"Per-process state {path!r}: processes {lacking or ['coordinator']} did "
                "not save it; every process must save the same objects"
            )
        graph["nodes"][path] = {**nodes[path], "states": [r["values"][path] for r in by_process]}
    return graph
