"""Reading checkpoints written by ``orbax-checkpoint`` (migration in, never out).

An Orbax PyTree checkpoint (``StandardCheckpointer``, ``PyTreeCheckpointer``) is a
directory with a JSON ``_METADATA`` (the tree: each leaf's key path and value type, and
whether the arrays are in OCDBT and Zarr v3) and one Zarr array per leaf, named by its
key path joined with ``.`` (``params.dense.kernel``): in an OCDBT database at the top of
the directory (Orbax's default), or in plain sub-directories (``use_ocdbt=False``).
Both open through TensorStore's own drivers (``ocdbt`` kvstore, ``zarr``/``zarr3``), so
nothing is unpickled and only JSON is parsed. The result is a ``CheckpointMetadata``
that ``restore_pytree``, ``target_from_metadata``, ``read_metadata`` and
``dcheckpoint inspect`` take like one of ours; `read_arrays` reads each process's own
slices onto the target shardings with the engine's read plan. Users migrate by
restoring an Orbax checkpoint and saving it with dcheckpoint.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from . import _tensorstore as tsio
from ._metadata import SUPPORTED_DTYPES, ArrayMetadata, CheckpointMetadata
from ._paths import join_path
from ._plan import finish_read, plan_read
from .errors import CheckpointMismatchError, CorruptCheckpointError

__all__ = ["METADATA_FILE", "OrbaxMetadata", "read_arrays", "read_orbax_metadata"]

METADATA_FILE = "_METADATA"  # Orbax's tree metadata, the mark of its PyTree checkpoints
WRITER = "orbax-checkpoint"
_SHARDING_FILE = "_sharding"
_CHECKPOINT_FILE = "_CHECKPOINT_METADATA"
_MAX_JSON_BYTES = 64 << 20
_LEAF_TYPES = {"jax.Array", "np.ndarray", "scalar"}
_SEQUENCE_KEY = 1  # Orbax's key_type for list and tuple indices (2: dict keys, attributes)


@dataclasses.dataclass(frozen=True)
class OrbaxMetadata(CheckpointMetadata):
    """An Orbax checkpoint's metadata: where its arrays are is ``spec`` (the TensorStore
    driver and kvstore), decided here from the directory, never read from a file."""

    spec: dict = dataclasses.field(default_factory=dict)


def read_orbax_metadata(storage, directory: str) -> OrbaxMetadata:
    """The metadata of the Orbax checkpoint at ``directory``, as dcheckpoint's.

    Raises:
      CorruptCheckpointError: ``_METADATA`` is not the JSON Orbax writes, a leaf's array
        is missing or unreadable, or a name would leave the directory.
      CheckpointMismatchError: a leaf of a type there is no array for (a string).
    """
    source = os.path.join(directory, METADATA_FILE)
    tree = _json(storage, METADATA_FILE, source)
    leaves = tree.get("tree_metadata") if isinstance(tree, dict) else None
    if not isinstance(leaves, dict):
        raise CorruptCheckpointError(f"{source}: expected Orbax's {{'tree_metadata': ...}}")
    kvstore = _kvstore(storage, tree)
    driver = "zarr3" if tree.get("use_zarr3") else "zarr"
    shardings = _saved_specs(storage, directory)
    entries, containers = [], {"": "dict"}
    for entry in leaves.values():
        keys, value_type = _leaf(entry, source)
        path = join_path(str(k) for k, _ in keys)
        for depth in range(len(keys)):
            parent = join_path(str(k) for k, _ in keys[:depth])
            containers[parent] = "list" if keys[depth][1] == _SEQUENCE_KEY else "dict"
        entries.append((path, ".".join(str(k) for k, _ in keys), value_type))
    opened = [(path, name, value_type, ts.open(
        {"driver": driver, "kvstore": _under(kvstore, _param_path(name, source))},
        open=True, read=True, context=tsio.context())) for path, name, value_type in entries]
    arrays = {}
    for path, name, value_type, future in opened:
        try:
            store = tsio.wait(future, timeout_secs=tsio.default_timeout_secs(),
                              what=f"opening Orbax array {name!r}")
        except ValueError as e:  # TensorStore's NOT_FOUND and bad-metadata errors
            raise CorruptCheckpointError(
                f"{source} lists array {name!r}, which cannot be opened as {driver} in "
                f"{directory!r}: {str(e).split(' [tensorstore_spec')[0]}") from e
        dtype = store.dtype.numpy_dtype
        if dtype.name not in SUPPORTED_DTYPES:
            raise CheckpointMismatchError(
                f"Orbax array {name!r} in {directory!r} has dtype {dtype}, which dcheckpoint "
                f"does not read; supported: {sorted(SUPPORTED_DTYPES)}")
        shape = tuple(int(d) for d in store.shape)
        python_type = None
        if value_type == "scalar" and shape == ():
            python_type = {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(dtype.kind)
        arrays[path] = ArrayMetadata(
            storage_path=name, shape=shape, dtype=dtype,
            chunk_shape=tuple(int(c) for c in store.chunk_layout.read_chunk.shape or shape),
            layout=shardings.get(name), python_type=python_type)
    kinds = {p: k for p, k in containers.items() if p not in arrays}
    return OrbaxMetadata(
        arrays=arrays,
        object_graph={"kind": "pytree", "leaves": sorted(arrays), "containers": kinds},
        writer={"library": WRITER, "ocdbt": kvstore["driver"] == "ocdbt", "zarr": driver},
        save_time=_commit_time(storage),
        format_version=0,
        spec={"driver": driver, "kvstore": kvstore},
    )


def manager_step_items(storage) -> list[str]:
    """The items of an Orbax ``CheckpointManager`` step directory (``run/12`` holding
    ``_CHECKPOINT_METADATA`` and ``default/_METADATA``), so a restore pointed at the step
    can name the directory to restore instead; [] for anything else."""
    if not storage.exists(_CHECKPOINT_FILE):
        return []
    return [name for name in sorted(storage.list_dir())
            if storage.exists(f"{name}/{METADATA_FILE}")]


def read_arrays(metadata: OrbaxMetadata, targets: dict[str, Any],
                directory: str) -> dict[str, Any]:
    """Reads ``{path: target}`` of an Orbax checkpoint: each process only the slices
    its own devices need, onto the target's sharding (see ``_plan.plan_read``)."""
    spec = metadata.spec
    plans = {path: plan_read(path, metadata.arrays[path], target)
             for path, target in targets.items()}
    stores = {path: ts.open({"driver": spec["driver"], "kvstore": _under(
        spec["kvstore"], _param_path(metadata.arrays[path].storage_path, directory))},
        open=True, read=True, context=tsio.context()) for path in plans}
    reads = {}
    for path, (_, items) in plans.items():
        store = tsio.wait(stores[path], timeout_secs=tsio.default_timeout_secs(),
                          what=f"opening Orbax array {path!r} in {directory!r}")
        reads[path] = [(item, store[item.index].read()) for item in items]
    out = {}
    for path, (sharding, _) in plans.items():
        meta = metadata.arrays[path]
        pieces = [(item, np.asarray(tsio.wait(
            future, timeout_secs=tsio.default_timeout_secs(),
            what=f"reading Orbax array {path!r} in {directory!r}"))) for item, future in
            reads[path]]
        if sharding is None:
            array = pieces[0][1] if pieces else np.empty(meta.shape, meta.dtype)
        else:
            shards = [jax.device_put(data, device) for item, data in pieces
                      for device in item.devices]
            array = jax.make_array_from_single_device_arrays(meta.shape, sharding, shards)
        out[path] = finish_read(meta, targets[path], sharding, array)
    return out


def _json(storage, name: str, source: str) -> Any:
    try:
        return json.loads(storage.read_bytes(name, max_bytes=_MAX_JSON_BYTES))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{source} is not JSON: {e}") from None


def _kvstore(storage, tree: dict) -> dict:
    """Where the arrays are: the OCDBT database at the top, or the directory itself."""
    base = storage.kvstore_spec()
    if tree.get("use_ocdbt", True):
        return {"driver": "ocdbt", "base": base}
    return base


def _under(kvstore: dict, relpath: str) -> dict:
    """The kvstore of ``relpath`` inside ``kvstore`` (a key prefix in an OCDBT database,
    a sub-directory or object prefix otherwise)."""
    return {**kvstore, "path": kvstore.get("path", "") + relpath}


def _leaf(entry: Any, source: str) -> tuple[list[tuple[str, int]], str]:
    """``([(key, key_type)], value_type)`` of one ``tree_metadata`` entry, checked."""
    keys = entry.get("key_metadata") if isinstance(entry, dict) else None
    value = entry.get("value_metadata") if isinstance(entry, dict) else None
    if not (isinstance(keys, list) and keys and isinstance(value, dict) and all(
            isinstance(k, dict) and isinstance(k.get("key"), str | int) for k in keys)):
        raise CorruptCheckpointError(f"{source}: malformed tree_metadata entry {entry!r:.200}")
    value_type = value.get("value_type")
    path = [(k["key"], k.get("key_type")) for k in keys]
    if value_type not in _LEAF_TYPES:
        raise CheckpointMismatchError(
            f"{source}: leaf {'.'.join(str(k) for k, _ in path)!r} is an Orbax "
            f"{value_type!r}, which has no array to read; dcheckpoint reads Orbax leaves of "
            f"types {sorted(_LEAF_TYPES)}")
    return path, value_type


def _param_path(name: str, source: str) -> str:
    """An Orbax array name as a kvstore path, refused where it could leave the directory."""
    parts = name.split("/")
    if not name or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise CorruptCheckpointError(
            f"{source}: array name {name!r} is not a path inside the checkpoint")
    return name + "/"


def _saved_specs(storage, directory: str) -> dict[str, dict]:
    """``{array name: {"sharding_specs": [...]}}`` from Orbax's ``_sharding`` file (JSON),
    so ``target_from_metadata(path, mesh)`` keeps the saved axis names; {} without it."""
    if not storage.exists(_SHARDING_FILE):
        return {}
    found = {}
    table = _json(storage, _SHARDING_FILE, os.path.join(directory, _SHARDING_FILE))
    for key, value in table.items() if isinstance(table, dict) else ():
        try:
            name = base64.b64decode(key, validate=True).decode()
            spec = json.loads(value).get("partition_spec")
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
            continue  # a sharding we cannot use only loses the hint
        if not isinstance(spec, list):
            continue
        found[name] = {"sharding_specs": spec}
        mesh = json.loads(value)
        if isinstance(mesh.get("axis_names"), list) and isinstance(mesh.get("shape"), list):
            found[name]["mesh"] = {"axis_names": mesh["axis_names"], "shape": mesh["shape"]}
    return found


def _commit_time(storage) -> float:
    """When Orbax committed the checkpoint (``_CHECKPOINT_METADATA``), 0 if unknown."""
    if not storage.exists(_CHECKPOINT_FILE):
        return 0.0
    try:
        nanos = json.loads(storage.read_bytes(_CHECKPOINT_FILE, max_bytes=_MAX_JSON_BYTES)
                           ).get("commit_timestamp_nsecs")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return 0.0
    return nanos / 1e9 if isinstance(nanos, int) else 0.0
