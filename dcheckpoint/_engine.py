"""The storage engine: save a set of named arrays as one atomic checkpoint, restore any
subset onto any sharding.

Save protocol (one gather and one broadcast of small JSON per save, plus the id):

1. (coordinator) choose a save id; (all) receive it.
2. (all) write the chunks this process owns (replica 0 shards) into the staging
   location ``<prefix>.tmp-<id>/``; processes never write the same file.
3. (all) send a manifest of what was written, or the local error, to the coordinator.
4. (coordinator) check that every chunk of every array was written exactly once,
   write each array's ``zarr.json``, the group nodes, then the metadata file; fsync;
   rename the staging directory to ``<prefix>``.
5. (all) receive the outcome: every process returns the same path or raises the same
   error.

Restore needs no coordination: each process reads the metadata, then only the slices
its own devices need, straight into arrays for those devices.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from . import _packing, errors
from . import _tensorstore as tsio
from ._comm import Communicator, default_communicator
from ._gc import paused as _gc_paused
from ._gc import paused_unless_async as _gc_paused_unless_async
from ._metadata import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    CheckpointMetadata,
    decode_metadata,
    dtype_name,
    encode_metadata,
)
from ._options import CheckpointOptions
from ._plan import SavePlan, plan_read, plan_save
from ._storage import fsync_tree, open_storage
from .errors import CheckpointError, CheckpointNotFoundError, CoordinationError

__all__ = ["save_arrays", "plan_save", "snapshot", "write_and_commit", "read_metadata",
           "restore_arrays", "is_committed"]


@_gc_paused
def save_arrays(
    directory: str,
    arrays: Mapping[str, Any],
    *,
    object_graph: Any = None,
    options: CheckpointOptions | None = None,
    comm: Communicator | None = None,
) -> str:
    """Saves ``{logical path: array}`` as one committed checkpoint at ``directory``.

    Collective: every process calls it with the same paths. See the module docstring
    for the protocol.

    Returns:
      ``directory``, on every process.
    Raises:
      CheckpointError: on every process, if any process failed to write.
    """
    comm = comm or default_communicator()
    plan = plan_save(arrays, is_coordinator=comm.is_coordinator)
    return write_and_commit(directory, plan, object_graph=object_graph, options=options,
                            comm=comm)


@_gc_paused
def snapshot(plan: SavePlan) -> SavePlan:
    """Takes this process's shards into host memory, so the caller may drop the arrays.

    All device-to-host transfers are started before the first one is awaited.
    """
    for item in plan.writes:
        if isinstance(item.data, jax.Array):
            item.data.copy_to_host_async()
    writes = tuple(
        type(item)(item.path, item.index, item.chunk, _host_snapshot(item.data))
        for item in plan.writes
    )
    return SavePlan(arrays=plan.arrays, writes=writes)


def _host_snapshot(data) -> np.ndarray:
    """A host value of ``data`` that nothing the caller does later can change.

    For a jax.Array, ``np.asarray`` is a device-to-host copy on accelerators. On CPU it
    is a zero-copy view holding an external reference to the buffer, and that reference
    is enough: XLA keeps the buffer alive through ``delete()`` and declines to donate
    it to a jitted step until the view is dropped (tests/test_async.py checks both).
    A numpy value can be changed in place by its owner, so it is copied.
    """
    if isinstance(data, jax.Array):
        return np.asarray(data)
    return np.array(data, copy=True)


@_gc_paused_unless_async
def write_and_commit(
    directory: str,
    plan: SavePlan,
    *,
    object_graph: Any = None,
    options: CheckpointOptions | None = None,
    comm: Communicator | None = None,
) -> str:
    """Steps 1-5 of the save protocol for an already planned save."""
    options = options or CheckpointOptions()
    comm = comm or default_communicator()
    timeout = options.timeout_secs
    target = open_storage(directory)

    # 1. (coordinator) choose the save id; (all) receive it.
    save_id = uuid.uuid4().hex[:12] if comm.is_coordinator else None
    save_id = comm.broadcast(
        save_id.encode() if save_id else None, tag="save id", timeout_secs=timeout
    ).decode()
    staged = target.staging(save_id)

    # 2. (all) write owned chunks; 3. (all) report them to the coordinator.
    manifest: dict[str, Any] = {"process": comm.process_index, "arrays": _table_digest(plan)}
    try:
        packer = _packing.Packer(plan, comm.process_index, options.pack_below_bytes)
        manifest["chunks"] = _write_chunks(staged, plan, options.compression, packer)
        manifest["packed"] = packer.report()
    except Exception as e:  # reported to every process through the coordinator
        manifest["error"] = f"process {comm.process_index}: {_describe(e)}"
        local_error = e
    else:
        local_error = None
    manifests = comm.gather(json.dumps(manifest).encode(), tag="save manifests",
                            timeout_secs=timeout)

    # 4. (coordinator) verify and commit.
    outcome = None
    if comm.is_coordinator:
        try:
            reports = [json.loads(m) for m in manifests]
            _check_manifests(plan, reports)
            packed = _packing.table_from_reports(plan, reports)
            _commit(target, staged, plan, object_graph, options.compression, comm, packed)
            outcome = {"path": directory}
        except Exception as e:
            staged.remove_tree()  # every writer is done (they sent their manifests)
            outcome = {"error": _describe(e), "kind": _error_kind(e)}
            local_error = local_error or e

    # 5. (all) receive the outcome.
    outcome = json.loads(comm.broadcast(
        json.dumps(outcome).encode() if comm.is_coordinator else None,
        tag="save outcome", timeout_secs=timeout,
    ))
    if "error" in outcome:
        error_type = getattr(errors, outcome.get("kind", ""), CheckpointError)
        raise error_type(f"Saving checkpoint {directory!r} failed: {outcome['error']}") \
            from local_error
    return directory


def _write_chunks(staged, plan: SavePlan, compression,
                  packer: _packing.Packer | None = None) -> dict[str, list[list[int]]]:
    """Writes this process's chunks; returns {path: [chunk coordinates]}.

    Chunks of small arrays go to ``packer`` (a few packed files); they are listed with
    the others, so the coordinator's coverage count includes them.
    """
    by_path: dict[str, list] = {}
    for item in plan.writes:
        by_path.setdefault(item.path, []).append(item)
    packed_paths = {p for p in by_path if packer and packer.holds(p)}
    chunks = {path: [list(i.chunk) for i in items] for path, items in by_path.items()}
    by_path = {p: items for p, items in by_path.items() if p not in packed_paths}
    opens = {
        path: tsio.open_for_write(
            staged.kvstore_spec(plan.arrays[path].storage_path), plan.arrays[path],
            compression, create=False,
        )
        for path in by_path
    }
    writes = packer.write(staged, compression) if packer else []
    for path, items in by_path.items():
        array = opens[path].result()
        for item in items:
            # The data outlives the write (jax.Arrays are immutable; async saves write
            # their own snapshot), so TensorStore may encode from it without a copy.
            writes.append(array[item.index].write(
                np.asarray(item.data), can_reference_source_data_indefinitely=True))
    # Wait for every write, even after one failed: the coordinator removes the staging
    # directory on failure, and a write still in flight would re-create it.
    failures = []
    for w in writes:
        try:
            w.result()
        except Exception as e:  # noqa: BLE001 (the first one is raised below)
            failures.append(e)
    if failures:
        raise failures[0]
    return chunks


def _check_manifests(plan: SavePlan, reports: list[dict]) -> None:
    """(coordinator) Every chunk of every array written exactly once, by someone."""
    failures = [r["error"] for r in reports if "error" in r]
    if failures:
        raise CheckpointError("; ".join(failures))
    expected_digest = _table_digest(plan)
    for r in reports:
        if r["arrays"] != expected_digest:
            raise CoordinationError(
                f"process {r['process']} saved a different set of arrays (or shapes, "
                "dtypes) than the coordinator; every process must save the same tree"
            )
    for path, meta in plan.arrays.items():
        grid = [-(-s // c) for s, c in zip(meta.shape, meta.chunk_shape, strict=True)]
        expected = math.prod(grid)  # 1 for a scalar, 0 for a zero-size array
        seen: dict[tuple, int] = {}
        for r in reports:
            for chunk in r["chunks"].get(path, []):
                seen[tuple(chunk)] = seen.get(tuple(chunk), 0) + 1
        twice = [list(c) for c, n in seen.items() if n > 1]
        if twice or len(seen) != expected:
            raise CheckpointError(
                f"Array {path!r}: expected {expected} chunks written once each, found "
                f"{len(seen)} distinct chunks, {len(twice)} written more than once "
                f"(first: {twice[:3]})"
            )


def _commit(target, staged, plan: SavePlan, object_graph, compression, comm,
            packed: _packing.PackedTable | None = None) -> None:
    """(coordinator) Zarr metadata, group nodes, metadata file, fsync, publish."""
    unpacked = [m for p, m in plan.arrays.items() if not (packed and packed.holds(p))]
    creates = [
        tsio.open_for_write(staged.kvstore_spec(m.storage_path), m, compression, create=True)
        for m in unpacked
    ] + _packing.create_arrays(staged, packed, compression)
    for c in creates:
        c.result()
    groups = {""} | _packing.group_paths(packed)
    for m in unpacked:
        parts = m.storage_path.split("/")[:-1]
        groups.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for group in sorted(groups):
        staged.write_bytes_atomic(os.path.join(group, "zarr.json"), tsio.group_node())
    meta = CheckpointMetadata(
        arrays=plan.arrays,
        object_graph=object_graph,
        save_time=time.time(),
        writer={
            "process_count": comm.process_count,
            "hostname": socket.gethostname(),
            "jax_version": jax.__version__,
        },
        packed=packed,
    )
    fsync_tree(staged.path)
    staged.write_bytes_atomic(METADATA_FILE, encode_metadata(meta))
    target.publish(staged)


def is_committed(directory: str) -> bool:
    """Whether ``directory`` holds a committed checkpoint (its metadata file exists)."""
    return open_storage(directory).exists(METADATA_FILE)


@_gc_paused
def read_metadata(directory: str) -> CheckpointMetadata:
    """Reads and validates a committed checkpoint's metadata.

    Raises:
      CheckpointNotFoundError: nothing committed at ``directory``.
      CorruptCheckpointError: the metadata file is damaged or malformed.
    """
    storage = open_storage(directory)
    if not storage.exists(METADATA_FILE):
        why = ("the directory exists but has no metadata file: an incomplete save"
               if storage.exists() else "no such directory")
        raise CheckpointNotFoundError(
            f"No committed checkpoint at {directory!r} ({why}); expected {METADATA_FILE}"
        )
    data = storage.read_bytes(METADATA_FILE, max_bytes=MAX_METADATA_BYTES)
    return decode_metadata(data, source=os.path.join(directory, METADATA_FILE))


@_gc_paused
def restore_arrays(
    directory: str,
    targets: Mapping[str, Any],
    *,
    metadata: CheckpointMetadata | None = None,
) -> dict[str, Any]:
    """Reads the arrays named in ``targets`` onto their target shardings.

    Args:
      targets: {logical path: a ``Sharding``, ``ShapeDtypeStruct`` with a sharding,
        ``jax.Array`` (its sharding, shape and dtype), numpy array or None (host)}.
    Returns:
      {logical path: jax.Array, or numpy array for host targets}.
    Raises:
      CheckpointNotFoundError: no checkpoint, or no array of that path in it.
      CheckpointMismatchError: a target expects another shape or dtype.
      CorruptCheckpointError: stored data fails its checksum or is missing.
    """
    storage = open_storage(directory)
    metadata = metadata or read_metadata(directory)
    plans = {}
    for path, target in targets.items():
        meta = metadata.arrays.get(path)
        if meta is None:
            raise CheckpointNotFoundError(
                f"Array {path!r} is not in checkpoint {directory!r}; it holds "
                f"{_preview(metadata.arrays)}"
            )
        plans[path] = plan_read(path, meta, target)
    packed = {p: plans.pop(p) for p in list(plans)
              if metadata.packed and metadata.packed.holds(p)}
    restored = _packing.restore(storage, metadata, packed, directory)
    opened = {
        path: tsio.open_for_read(
            storage.kvstore_spec(storage_rel(storage, metadata.arrays[path].storage_path)),
            metadata.arrays[path],
        )
        for path, (_, reads) in plans.items() if reads
    }
    jobs = []
    for path, (_, reads) in plans.items():
        array = _result(opened[path], path, directory) if path in opened else None
        jobs.extend((path, array, r) for r in reads if array is not None)
    parts = _read_windowed(jobs, metadata, directory)
    restored.update(
        (path, _assemble(metadata.arrays[path], sharding, parts.get(path, [])))
        for path, (sharding, _) in plans.items()
    )
    return {path: restored[path] for path in targets}


def _read_windowed(jobs, metadata, directory) -> dict[str, list]:
    """Runs every read with at most ``_READ_WINDOW_BYTES`` in flight; {path: parts}.

    The window keeps the disk and TensorStore's threads busy while bounding the memory
    beyond the restored arrays themselves: a read in flight holds TensorStore's buffer
    and its output at once, so issuing all reads together would double the peak.
    A read that spans several saved chunks (a resharded or replicated target) is split
    at chunk boundaries into pieces that stream into one destination buffer, so a
    64 MiB replicated read is eight 8 MiB reads in flight, not one.
    """
    parts: dict[str, list] = {}
    tasks: collections.deque = collections.deque()
    remaining: dict[int, int] = {}  # id(read) -> pieces not yet copied into its buffer
    for path, array, read in jobs:
        meta = metadata.arrays[path]
        pieces = _chunk_pieces(read.index, meta.chunk_shape)
        if len(pieces) == 1:
            tasks.append((path, array, read, None, read.index, None))
            continue
        dest = _aligned_empty(tuple(s.stop - s.start for s in read.index), meta.dtype)
        if not pieces:  # zero-size
            parts.setdefault(path, []).append((read, dest))
        remaining[id(read)] = len(pieces)
        tasks.extend((path, array, read, dest, piece, local) for piece, local in pieces)
    in_flight: collections.deque = collections.deque()
    in_flight_bytes = 0
    while tasks or in_flight:
        while tasks and (not in_flight or in_flight_bytes < _READ_WINDOW_BYTES):
            path, array, read, dest, index, local = tasks.popleft()
            nbytes = metadata.arrays[path].dtype.itemsize * math.prod(
                s.stop - s.start for s in index)
            in_flight.append((path, read, dest, local, nbytes, array[index].read()))
            in_flight_bytes += nbytes
        path, read, dest, local, nbytes, future = in_flight.popleft()
        in_flight_bytes -= nbytes
        data = _result(future, path, directory)
        del future  # drop TensorStore's buffer as soon as it is copied out
        if dest is None:
            parts.setdefault(path, []).append((read, _adoptable(data, read.devices)))
            continue
        dest[local] = data
        remaining[id(read)] -= 1
        if remaining[id(read)] == 0:
            parts.setdefault(path, []).append((read, dest))
    return parts


def _chunk_pieces(index, chunk_shape) -> list[tuple[tuple, tuple]]:
    """Splits a global slice at chunk boundaries: [(global piece, slice within it)]."""
    per_dim = []
    for s, c in zip(index, chunk_shape, strict=True):
        cuts = [(lo, min(s.stop, (lo // c + 1) * c))
                for lo in [s.start, *range((s.start // c + 1) * c, s.stop, c)]
                if lo < s.stop]
        per_dim.append([(slice(lo, hi), slice(lo - s.start, hi - s.start)) for lo, hi in cuts])
    return [tuple(zip(*combo, strict=True)) if combo else ((), ())
            for combo in itertools.product(*per_dim)]


def storage_rel(storage, storage_path: str) -> str:
    """Checks that a storage path from metadata stays inside the checkpoint."""
    storage.resolve_inside(storage_path)
    return storage_path


_CPU_ALIGN = 64  # bytes; XLA's CPU client aliases host buffers aligned to this
_READ_WINDOW_BYTES = 64 << 20  # restore reads in flight at once (see _read_windowed)


def _assemble(meta, sharding, parts):
    if sharding is None:
        return parts[0][1] if parts else np.zeros(meta.shape, meta.dtype)
    if not parts:  # zero-size array
        return jax.device_put(np.zeros(meta.shape, meta.dtype), sharding)
    # One batched transfer. The buffers were read for this call and nobody else holds
    # them, so devices may adopt them (on CPU, aligned ones are not copied again).
    values = [data for read, data in parts for _ in read.devices]
    devices = [d for read, _ in parts for d in read.devices]
    shards = jax.device_put(values, devices, may_alias=True)
    return jax.make_array_from_single_device_arrays(meta.shape, sharding, shards)


def _adoptable(data: np.ndarray, devices) -> np.ndarray:
    """``data`` in a buffer XLA's CPU client can adopt without a copy (64-byte aligned).

    TensorStore's buffers are 16-byte aligned, so a CPU device_put would copy them;
    one copy into an aligned buffer here replaces that copy, and the TensorStore buffer
    is freed as soon as the caller drops it. Other platforms copy to the device anyway.
    """
    if not devices or devices[0].platform != "cpu" or data.ctypes.data % _CPU_ALIGN == 0:
        return data
    out = _aligned_empty(data.shape, data.dtype)
    np.copyto(out, data)
    return out


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array whose buffer starts on a ``_CPU_ALIGN`` boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _CPU_ALIGN, np.uint8)
    offset = -raw.ctypes.data % _CPU_ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _result(future, path: str, directory: str):
    try:
        return future.result()
    except (ValueError, RuntimeError, OSError) as e:
        raise tsio.translate_error(e, array=path, where=directory) from e


def _table_digest(plan: SavePlan) -> str:
    """A short digest of every array's path, shape and dtype, compared across processes."""
    table = sorted([p, list(m.shape), dtype_name(m.dtype)] for p, m in plan.arrays.items())
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _error_kind(e: Exception) -> str:
    for cls in type(e).__mro__:
        if cls.__module__ == errors.__name__:
            return cls.__name__
    return "CheckpointError"


def _preview(arrays: Mapping) -> str:
    names = sorted(arrays)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"{names[:10]}{more}"
