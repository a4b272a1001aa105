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
import queue as _queue
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from . import _tensorstore as tsio
from . import errors
from ._comm import Communicator, default_communicator
from ._metadata import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    CheckpointMetadata,
    decode_metadata,
    encode_metadata,
)
from ._options import CheckpointOptions
from ._plan import SavePlan, plan_read, plan_save
from ._storage import fsync_tree, open_storage
from .errors import CheckpointError, CheckpointNotFoundError, CoordinationError

__all__ = ["save_arrays", "plan_save", "snapshot", "write_and_commit", "read_metadata",
           "restore_arrays", "is_committed"]


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


def snapshot(plan: SavePlan) -> SavePlan:
    """Takes this process's shards into host memory, so the caller may drop the arrays.

    All device-to-host transfers are started before the first one is awaited: on an
    accelerator, one batched transfer into pinned host memory (`_pinned_snapshots`);
    on CPU, a zero-copy view of each buffer (`_host_snapshot`).
    """
    pinned = _pinned_snapshots([item.data for item in plan.writes])
    for item in plan.writes:
        if isinstance(item.data, jax.Array) and id(item.data) not in pinned:
            if not _on_cpu(item.data):
                item.data.copy_to_host_async()
    writes = tuple(
        type(item)(item.path, item.index, item.chunk,
                   pinned[id(item.data)] if id(item.data) in pinned
                   else _host_snapshot(item.data))
        for item in plan.writes
    )
    return SavePlan(arrays=plan.arrays, writes=writes)


def _on_cpu(data: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in data.devices())


def _pinned_snapshots(values, *, cpu: bool = False) -> dict[int, np.ndarray]:
    """{id(shard): host copy} for the accelerator shards, by one batched transfer.

    ``jax.device_put`` into each device's ``pinned_host`` memory starts every copy at
    once and lands in page-locked memory, which the DMA engines fill at full speed
    (a pageable copy per shard is several times slower, and serial); ``np.asarray`` of
    a pinned-host array is then a view, not another copy. The copies are new buffers,
    so later changes, deletion or donation of the device arrays cannot reach them.
    Returns {} where there is no pinned host memory (a backend without it); the caller
    then copies through pageable memory. CPU arrays are left to `_host_snapshot`'s
    zero-copy view unless ``cpu`` (tests use it to run this path on CPU devices).
    """
    shards = [v for v in values if isinstance(v, jax.Array) and (cpu or not _on_cpu(v))]
    if not shards:
        return {}
    try:
        targets = [jax.sharding.SingleDeviceSharding(next(iter(v.devices())),
                                                     memory_kind="pinned_host")
                   for v in shards]
        copies = jax.device_put(shards, targets)
        return {id(v): np.asarray(c) for v, c in zip(shards, copies, strict=True)}
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return {}  # no pinned_host memory kind here: fall back to pageable copies


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
        manifest["chunks"] = _write_chunks(staged, plan, options.compression)
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
            _commit(target, staged, plan, object_graph, options.compression, comm)
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


def _write_chunks(staged, plan: SavePlan, compression) -> dict[str, list[list[int]]]:
    """Writes this process's chunks; returns {path: [chunk coordinates]}."""
    by_path: dict[str, list] = {}
    for item in plan.writes:
        by_path.setdefault(item.path, []).append(item)
    opens = {
        path: tsio.open_for_write(
            staged.kvstore_spec(plan.arrays[path].storage_path), plan.arrays[path],
            compression, create=False,
        )
        for path in by_path
    }
    writes = []
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
    return {path: [list(i.chunk) for i in items] for path, items in by_path.items()}


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


def _commit(target, staged, plan: SavePlan, object_graph, compression, comm) -> None:
    """(coordinator) Zarr metadata, group nodes, metadata file, fsync, publish."""
    creates = [
        tsio.open_for_write(staged.kvstore_spec(m.storage_path), m, compression, create=True)
        for m in plan.arrays.values()
    ]
    for c in creates:
        c.result()
    groups = {""}
    for m in plan.arrays.values():
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
    )
    fsync_tree(staged.path)
    staged.write_bytes_atomic(METADATA_FILE, encode_metadata(meta))
    target.publish(staged)


def is_committed(directory: str) -> bool:
    """Whether ``directory`` holds a committed checkpoint (its metadata file exists)."""
    return open_storage(directory).exists(METADATA_FILE)


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


def restore_arrays(
    directory: str,
    targets: Mapping[str, Any],
    *,
    metadata: CheckpointMetadata | None = None,
) -> dict[str, Any]:
    """Reads the arrays named in ``targets`` onto their target shardings.

    Reads stream (see `_Restore`): each slice goes to its devices as soon as its reads
    complete, so host memory beyond the restored arrays stays within the read window.

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
    opened = {
        path: tsio.open_for_read(
            storage.kvstore_spec(storage_rel(storage, metadata.arrays[path].storage_path)),
            metadata.arrays[path],
        )
        for path, (_, reads) in plans.items()
        if reads and metadata.arrays[path].nbytes
    }
    restore = _Restore(directory, metadata)
    for path, (sharding, reads) in plans.items():
        array = _result(opened[path], path, directory) if path in opened else None
        restore.add(path, sharding, reads, array)
    return restore.run()


def read_window() -> tuple[int, int]:
    """(bytes, reads) a restore keeps in flight at most.

    Bytes: 32 MiB per core, at least 256 MiB and at most 1 GiB, and never more than an
    eighth of the memory available now. 256 MiB is 32 reads of 8 MiB inner chunks,
    what TensorStore's 32 concurrent file calls (`_tensorstore.context`) can use (the
    64 MiB window this replaced left the disk idle between big chunks); more cores
    decode and copy more pieces at once, and on an accelerator a 16-core host keeps
    two 256 MiB slices going, so one slice's last pieces overlap the next one's reads.
    Reads: two per core, 16 to 64, so small pieces still keep the cores and disk busy.
    """
    cores = os.cpu_count() or 1
    window = min(max(256 << 20, (32 << 20) * cores), 1 << 30)
    available = _available_memory()
    if available:
        window = min(window, max(64 << 20, available // 8))
    return window, min(max(16, 2 * cores), 64)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Slice:
    """One target slice being restored: its host buffer and the pieces still to come."""

    def __init__(self, path, read, dtype):
        self.path, self.read = path, read
        self.buffer = _aligned_empty(tuple(s.stop - s.start for s in read.index), dtype)
        self.view = tsio.writable_view(self.buffer)  # reads land here
        self.waiting = 0  # pieces not yet read
        self.nbytes, self.itemsize = self.buffer.nbytes, self.buffer.itemsize
        # Copied to an accelerator and freed; on CPU (or host) the buffer is the result.
        self.transient = any(d.platform != "cpu" for d in read.devices)


class _Restore:
    """Streams reads from storage to devices.

    The reads of every target slice are cut into pieces at the stored array's read
    granularity (an inner chunk of a sharded shard, else a chunk; see
    `_tensorstore.zarr_spec`), and TensorStore writes each piece straight into the
    slice's host buffer: one copy per byte, on TensorStore's threads. A stored chunk
    that several slices need is read once and its parts copied to each (every stored
    byte is read once when a checkpoint from a few big shards is restored onto many
    devices). A slice goes to its devices as
    soon as its last piece lands, and an array is built as soon as its last slice has.

    Memory: pieces in flight (TensorStore's buffers) stay within the window
    (`read_window`), and a new slice bound for an accelerator starts only while the
    host buffers of started ones total less than the window; so host memory beyond
    the restored arrays is bounded by about twice the window (plus one slice), not by
    the checkpoint. On CPU the host buffers become the device buffers (64-byte
    aligned, adopted without a copy); on accelerators they are freed once copied.
    """

    def __init__(self, directory: str, metadata: CheckpointMetadata):
        self.directory, self.metadata = directory, metadata
        self.pieces: list[tuple] = []  # (order key, slice, stored array, piece, local)
        self.shards: dict[str, list] = {}  # path -> device buffers so far
        self.targets: dict[str, tuple] = {}  # path -> (sharding, slices left)
        self.done: dict[str, Any] = {}

    def add(self, path: str, sharding, reads, array) -> None:
        meta = self.metadata.arrays[path]
        if meta.nbytes == 0 or array is None:  # nothing stored: zero-size
            value = np.zeros(meta.shape, meta.dtype)
            self.done[path] = value if sharding is None else jax.device_put(value, sharding)
            return
        self.targets[path] = (sharding, len(reads))
        self.shards[path] = []
        grid = _piece_grid(array, meta)
        for read in reads:
            target = _Slice(path, read, meta.dtype)
            for piece, local in _chunk_pieces(read.index, grid):
                chunk = tuple(s.start // g for s, g in zip(piece, grid, strict=True))
                target.waiting += 1
                self.pieces.append(((len(self.targets), chunk), target, array, piece, local))
            if target.waiting == 0:  # cannot happen for a non-empty array; be safe
                self._finish(target)

    def run(self) -> dict[str, Any]:
        window, max_reads = read_window()
        self.pieces.sort(key=lambda p: p[0])
        groups = collections.deque(
            list(g) for _, g in itertools.groupby(self.pieces, key=lambda p: p[0]))
        self.pieces = []
        self.queue: _queue.SimpleQueue = _queue.SimpleQueue()
        self.in_flight: dict[int, tuple] = {}  # future id -> (future, what, bytes)
        self.open: dict[int, int] = {}  # group id -> its pieces not yet landed
        self.reading = 0  # bytes being read (TensorStore's buffers)
        self.held = 0  # host buffers of started slices that are copied, then freed
        self.started: set[int] = set()

        def admits(group) -> bool:
            if not self.in_flight:
                return True  # always make progress
            if self.reading >= window or len(self.open) >= max_reads:
                return False
            new = [t for _, t, *_ in group if id(t) not in self.started and t.transient]
            return not new or self.held < window

        try:
            while groups or self.in_flight:
                while groups and admits(groups[0]):
                    self._start(groups.popleft())
                self._land(*self.in_flight.pop(self.queue.get()))
        except BaseException:
            for future, *_ in self.in_flight.values():
                future.cancel()
            raise
        return self.done

    def _start(self, group: list) -> None:
        """Starts the reads of one stored chunk's pieces (a group)."""
        self.open[id(group)] = len(group)
        for _, target, *_ in group:
            if id(target) not in self.started:
                self.started.add(id(target))
                self.held += target.nbytes if target.transient else 0
        _, target, array, piece, local = group[0]
        if len(group) == 1 and target.view is not None:  # straight into the buffer
            self._issue(target.view[local].write(array[piece]), ("piece", group, target),
                        target.itemsize * _size(piece))
            return
        # Several slices need this chunk: one read of their region, then each slice's
        # part goes to its buffer (TensorStore dedupes concurrent reads of a chunk
        # only when they happen to overlap; one read makes "read once" certain).
        region = tuple(slice(min(p[3][d].start for p in group), max(p[3][d].stop for p in group))
                       for d in range(len(piece)))
        self._issue(array[region].read(), ("region", group, region),
                    target.itemsize * _size(region))

    def _issue(self, future, what: tuple, nbytes: int) -> None:
        key = id(future)
        self.in_flight[key] = (future, what, nbytes)
        self.reading += nbytes
        future.add_done_callback(lambda _, key=key: self.queue.put(key))

    def _land(self, future, what: tuple, nbytes: int) -> None:
        self.reading -= nbytes
        kind, group, rest = what
        value = _result(future, group[0][1].path, self.directory)
        if kind == "piece":
            self._piece_done(group, rest)
            return
        for _, target, _, piece, local in group:
            part = value[tuple(slice(p.start - r.start, p.stop - r.start)
                               for p, r in zip(piece, rest, strict=True))]
            if target.view is None:  # an older TensorStore: copy here
                target.buffer[local] = part
                self._piece_done(group, target)
            else:  # copied on TensorStore's threads; ``value`` is never changed
                self._issue(target.view[local].write(
                    part, can_reference_source_data_indefinitely=True),
                    ("piece", group, target), 0)

    def _piece_done(self, group: list, target: _Slice) -> None:
        self.open[id(group)] -= 1
        if self.open[id(group)] == 0:
            del self.open[id(group)]
        target.waiting -= 1
        if target.waiting == 0:
            self.held -= target.nbytes if target.transient else 0
            self._finish(target)

    def _finish(self, target: _Slice) -> None:
        """Hands a complete slice to its devices; builds its array once all are there."""
        path, read = target.path, target.read
        sharding, left = self.targets[path]
        if sharding is None:
            self.done[path] = target.buffer
            return
        # The buffer was read for this call and nobody else holds it, so devices may
        # adopt it (on CPU it is not copied again); elsewhere device_put copies it.
        kind = getattr(sharding, "memory_kind", None)  # e.g. pinned_host for offloading
        self.shards[path].extend(jax.device_put(
            [target.buffer] * len(read.devices),
            [jax.sharding.SingleDeviceSharding(d, memory_kind=kind) for d in read.devices],
            may_alias=True))
        target.buffer = target.view = None
        self.targets[path] = (sharding, left - 1)
        if left == 1:
            meta = self.metadata.arrays[path]
            self.done[path] = jax.make_array_from_single_device_arrays(
                meta.shape, sharding, self.shards.pop(path))


def _size(index) -> int:
    return math.prod(s.stop - s.start for s in index)


def _piece_grid(array, meta) -> tuple[int, ...]:
    """The grid restore pieces follow: the stored read chunks, merged along the first
    dimension up to about one inner chunk's bytes, so small stored chunks do not become
    small reads. Piece edges stay on read-chunk edges (multiples of the read chunk;
    inner chunks divide their shard), so pieces never split a stored read chunk."""
    grid = list(tsio.read_chunk_shape(array, meta.chunk_shape))
    row_bytes = math.prod(grid[1:]) * meta.dtype.itemsize
    if grid and row_bytes:
        rows = (tsio.INNER_CHUNK_BYTES // row_bytes) // grid[0] * grid[0]
        grid[0] = max(grid[0], min(rows, meta.chunk_shape[0]))
    return tuple(grid)


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
    table = sorted([p, list(m.shape), m.dtype.name] for p, m in plan.arrays.items())
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
