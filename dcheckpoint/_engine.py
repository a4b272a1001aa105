"""The storage engine: save a set of named arrays as one atomic checkpoint, restore any
subset onto any sharding.

Save protocol: two agreement steps (``_comm.agree``: one small gather and one
broadcast each; three when a steady-state save falls back to full manifests), so the
coordination cost grows with the processes, not the bytes (docs/SCALING.md).

1. (all) agree on the save's identity: the target path, the array table's digest, the
   compression, a digest per key of the caller's metadata dict and which agreement of
   the job this is. (coordinator) if every process names the same save, choose a save
   id; otherwise every process raises the same CoordinationError naming who disagreed
   on what, and nothing is written.
2. (all) write the chunks this process owns (replica 0 shards) into the staging
   location ``<prefix>.tmp-<id>/``, under the save's own data directory
   ``data-<id>/``; processes never write the same file.
3. (all) send a manifest of what was written, or the local error, to the coordinator:
   the compact full manifest (`_manifest`: chunk ranges per group of arrays), or, when
   this process saved the same plan before, only the plan's fingerprint, its chunk
   count and the full manifest's digest (a steady-state save: O(1) bytes).
4. (coordinator) check that every chunk of every array was written exactly once (from
   full manifests with `_manifest.check_coverage`; from short ones by matching the
   cached, checked manifests of the same plan; if they do not match, every process is
   asked for its full manifest, one more agreement step of the same save),
   write each array's ``zarr.json``, the group nodes, then the metadata file; fsync;
   rename the staging directory to ``<prefix>``.
5. (all) receive the outcome: every process returns the same path or raises the same
   error.

Every save keeps its arrays under ``data-<save id>/``, a name no other save uses, and
the metadata's storage paths point there. So a checkpoint's data is never modified in
place: overwriting ``ckpt-5`` puts new files under new names, and a reader still
holding the old metadata reads the old files or, once they are gone, gets a
CheckpointNotFoundError saying the checkpoint was replaced, never new bytes.

Restore needs no coordination: each process reads the metadata, then only the slices
its own devices need, straight into arrays for those devices.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
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
from typing import Any, NoReturn

import jax
import numpy as np

from . import _manifest, _orbax, _packing, errors
from . import _tensorstore as tsio
from ._bounds import check_restore
from ._comm import (
    Communicator,
    agree,
    default_communicator,
    error_kind,
    run_ordered,
    wait_for_save_of,
)
from ._env import number_from_env
from ._gc import paused as _gc_paused
from ._gc import paused_unless_async as _gc_paused_unless_async
from ._log import log_save
from ._metadata import (
    MAX_METADATA_BYTES,
    METADATA_FILE,
    CheckpointMetadata,
    decode_metadata,
    dtype_name,
    encode_metadata,
)
from ._options import CheckpointOptions
from ._plan import SavePlan, finish_read, plan_read, plan_save, record_process_values
from ._state_file import STATE_FILENAME, is_committed, latest_checkpoint
from ._storage import fsync_tree, open_storage
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CoordinationError,
    CorruptCheckpointError,
)

__all__ = ["save_arrays", "plan_save", "save_failed_here", "snapshot", "write_and_commit",
           "read_metadata", "restore_arrays", "is_committed"]


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
    started = time.perf_counter()
    comm = comm or default_communicator()
    try:
        plan = plan_save(arrays, is_coordinator=comm.is_coordinator)
    except Exception as e:
        save_failed_here(directory, e, comm=comm, options=options)
    path = run_ordered(lambda: write_and_commit(
        directory, plan, object_graph=object_graph, options=options, comm=comm))
    seconds = time.perf_counter() - started
    log_save(path, sum(m.nbytes for m in plan.arrays.values()), seconds, seconds)
    return path


def save_failed_here(directory: str, error: Exception, *, comm: Communicator | None = None,
                     options: CheckpointOptions | None = None) -> NoReturn:
    """Joins the save's first collective with this process's failure, then raises it.

    A save that fails here before its first collective (an unsupported leaf, metadata
    JSON cannot hold, a tree another process does not have) must still take its place
    in the save's identity step: otherwise the other processes wait in it until the
    timeout and then find the job out of step. So this process reports the failure
    there, every process raises the same `CheckpointError` naming it at once, nothing
    is written, and the job stays in step; here ``error`` itself is raised.
    """
    comm = comm or default_communicator()
    timeout = (options or CheckpointOptions()).timeout_secs
    identity = {"error": f"process {comm.process_index}: {_describe(error)}"}
    try:
        run_ordered(lambda: agree(comm, identity, _decide_save_id, kind="save",
                                  tag=f"save identity of {directory!r}",
                                  timeout_secs=timeout))
    except CheckpointError:
        pass  # what every other process now raises; the caller gets its own error
    raise error


@_gc_paused
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
    return dataclasses.replace(plan, writes=writes)


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


# Per-phase timings of the last save each process of this interpreter made, by process
# index (one entry in a real job; every simulated process under `_threadcomm`), for
# scripts/scale.py: seconds of the identity step, of this process's writes, of the
# manifests-and-outcome step (waiting for the slowest writer, the coordinator's check
# and commit included), and on the coordinator of its check and its commit; ``steady``
# when the save was proven from cached manifests, ``resent`` when it fell back to them.
LAST_SAVE_PHASES: dict[int, dict[str, Any]] = {}


@_gc_paused_unless_async
def write_and_commit(
    directory: str,
    plan: SavePlan,
    *,
    object_graph: Any = None,
    options: CheckpointOptions | None = None,
    comm: Communicator | None = None,
    user_metadata: dict | None = None,
    writer=None,
) -> str:
    """Steps 1-5 of the save protocol for an already planned save.

    ``user_metadata``: the caller's checked JSON dict, stored in the metadata file.
    ``writer``: stands in for step 2's chunk writes, called like `_write_chunks` and
    returning the same ``{path: [chunk coordinates]}`` (scripts/scale.py simulates
    thousands of processes with it; None writes).

    Collective; callers run it through ``_comm.run_ordered`` (or ``_comm.submit``) so
    that it takes its place in the job's one order of collectives.
    """
    options = options or CheckpointOptions()
    comm = comm or default_communicator()
    timeout = options.timeout_secs
    phases: dict[str, Any] = {"steady": False, "resent": False}
    LAST_SAVE_PHASES[comm.process_index] = phases
    clock = time.perf_counter()

    # 1. (all) agree on which save this is; (coordinator) choose its id.
    try:
        target = open_storage(directory, timeout_secs=timeout)  # bounds storage waits too
        identity = {"path": target.path, "arrays": len(plan.arrays),
                    "table": _table_digest(plan), "compression": options.compression,
                    "metadata": _metadata_digests(user_metadata)}
    except Exception as e:  # reported by the coordinator, on every process
        target, identity = None, {"error": f"process {comm.process_index}: {_describe(e)}"}
    save_id = agree(comm, identity, _decide_save_id, kind="save",
                    tag=f"save identity of {directory!r}", timeout_secs=timeout)
    fingerprint = _manifest.plan_fingerprint(plan.arrays, comm.process_count)
    data_dir = data_dir_name(save_id)
    packed_root = f"{data_dir}/{_packing.root_name(plan.arrays)}"  # beside the arrays
    plan = _in_data_dir(plan, data_dir)
    phases["agree_s"], clock = time.perf_counter() - clock, time.perf_counter()

    # 2. (all) write owned chunks; 3. (all) report them to the coordinator: the full
    # manifest, or (a plan this process saved before) its fingerprint and digest.
    full: dict[str, Any] = {"process": comm.process_index, "values": plan.process_values}
    staged = local_error = None
    replaced: list[str] = []  # (coordinator, object stores) data of earlier saves
    try:
        staged = target.staging(save_id)
        if comm.is_coordinator and not target.renames_atomically:
            replaced = [name for name in target.list_dir()
                        if name.startswith(_DATA_DIR_PREFIX) and name != data_dir]
        packer = _packing.Packer(plan, comm.process_index, options.pack_below_bytes,
                                 root=packed_root)
        chunks = (writer or _write_chunks)(staged, plan, options.compression, packer)
        full["chunks"], full["count"] = _manifest.encode_chunks(sorted(plan.arrays), chunks)
        full["packed"] = _relative_packing(packer.report(), data_dir)
        full["plan"] = fingerprint
    except Exception as e:  # reported to every process through the coordinator
        full["error"] = f"process {comm.process_index}: {_describe(e)}"
        local_error = e
    phases["write_s"], clock = time.perf_counter() - clock, time.perf_counter()
    sent, coordinated = _manifest.caches_for(comm)
    manifest = full
    if "error" not in full and sent.knows(fingerprint):
        manifest = {"process": full["process"], "values": full["values"],
                    "plan": fingerprint, "count": full["count"],
                    "digest": _manifest.digest(full)}

    # 4. (coordinator) verify and commit; 5. (all) receive the outcome.
    def commit(reports: list[dict], *, last: bool) -> str | dict:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            packing = _check_manifests(plan, reports, fingerprint, coordinated)
            if isinstance(packing, str):  # a steady-state save that does not match
                if not last:
                    return {_manifest.RESEND: packing}
                raise CoordinationError(f"full manifests were asked for, but {packing}")
            graph = record_process_values(object_graph, reports)
            packed = _packing.table_from_reports(
                plan, [{"packed": _absolute_packing(p, data_dir)} for p in packing])
            phases["check_s"] = time.perf_counter() - started
            commit_started, commit_cpu = time.perf_counter(), time.thread_time()
            _commit(target, staged, plan, graph, options.compression, comm, replaced,
                    packed=packed, user_metadata=user_metadata)
            phases["commit_s"] = time.perf_counter() - commit_started
            phases["commit_cpu_s"] = time.thread_time() - commit_cpu
            if "chunks" in reports[0]:  # checked in full: the next save may be steady
                coordinated.remember(fingerprint, reports)
        except Exception as e:
            if staged is not None:
                staged.remove_tree()  # every writer is done (they sent their manifests)
            error_type = getattr(errors, error_kind(e))
            raise error_type(f"Saving checkpoint {directory!r} failed: {_describe(e)}") from e
        finally:
            phases["decide_cpu_s"] = time.thread_time() - cpu
        return directory

    tag = f"save manifests and outcome of {directory!r}"
    try:
        outcome = agree(comm, manifest, functools.partial(commit, last=False),
                        kind="save outcome", tag=tag, timeout_secs=timeout)
        if isinstance(outcome, dict):  # the coordinator asks for every full manifest
            phases["resent"] = True
            outcome = agree(comm, full, functools.partial(commit, last=True),
                            kind="save outcome", tag=f"full {tag}", timeout_secs=timeout)
    except CheckpointError as e:
        sent.forget(fingerprint)
        if local_error is not None:  # this process's own failure is the cause to show
            e.__cause__ = local_error
        raise
    finally:
        phases["outcome_s"] = time.perf_counter() - clock
    sent.remember(fingerprint, _manifest.digest(full))
    phases["steady"] = manifest is not full and not phases["resent"]
    return outcome


def _relative_packing(report: dict, data_dir: str) -> dict:
    """A packing report with its array names relative to the save's data directory,
    so the same plan gives the same report (and digest) in every save."""
    arrays = {name.removeprefix(f"{data_dir}/"): part
              for name, part in report.get("arrays", {}).items()}
    return {**report, "arrays": arrays}


def _absolute_packing(report: dict | None, data_dir: str) -> dict:
    report = report or {}
    arrays = {f"{data_dir}/{name}": part for name, part in report.get("arrays", {}).items()}
    return {**report, "arrays": arrays}


def _decide_save_id(identities: list[dict]) -> str:
    """(coordinator) A new save id if every process names the same save; else raises."""
    failures = [i["error"] for i in identities if "error" in i]
    if failures:
        raise CheckpointError("Cannot save: " + "; ".join(failures))
    if any(i != identities[0] for i in identities):
        raise CoordinationError(_disagreement(identities))
    return uuid.uuid4().hex[:12]


_IDENTITY_FIELDS = {"path": "the checkpoint path", "arrays": "the number of arrays",
                    "table": "the array table (paths, shapes, dtypes)",
                    "compression": "the compression",
                    "metadata": "the metadata dict (save(metadata=...))"}


def _metadata_digests(user_metadata: dict | None) -> dict | None:
    """A short digest per top-level key of the caller's metadata: compared across
    processes (only the coordinator's dict is stored, so ranks that computed different
    values must not pass silently), small to send, and it names the keys that differ."""
    if user_metadata is None:
        return None
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
            for key, value in user_metadata.items()}


def _disagreement(identities: list[dict]) -> str:
    """Which processes disagree on what, for a save whose identities differ."""
    parts = []
    for field, what in _IDENTITY_FIELDS.items():
        groups: dict[str, list[int]] = {}
        for process, identity in enumerate(identities):
            value = identity.get(field)
            if field == "metadata":  # which keys each process has, not their digests
                value = None if value is None else sorted(value)
            groups.setdefault(json.dumps(value), []).append(process)
        if field == "metadata" and len(groups) == 1 and len(
                {json.dumps(i.get(field), sort_keys=True) for i in identities}) > 1:
            keys = sorted({k for i in identities for k in (i.get(field) or {})
                           if len({(j.get(field) or {}).get(k) for j in identities}) > 1})
            alike: dict[str, list[int]] = {}
            for process, identity in enumerate(identities):
                alike.setdefault(json.dumps(identity.get(field), sort_keys=True),
                                 []).append(process)
            parts.append(f"{what} (different values for keys {keys}: processes "
                         f"{' vs '.join(str(p) for p in alike.values())})")
        elif len(groups) > 1:
            values = ", ".join(f"processes {procs}: {value}" for value, procs in groups.items())
            parts.append(f"{what} ({values})")
    return (
        "The processes are not saving the same checkpoint, so nothing was written or "
        f"committed; they disagree on {'; '.join(parts)}. Every process must make the "
        "same checkpoint calls, with the same paths and trees, in the same order"
    )


_DATA_DIR_PREFIX = "data-"


def data_dir_name(save_id: str) -> str:
    """The directory, inside the checkpoint, holding the arrays of save ``save_id``."""
    return f"{_DATA_DIR_PREFIX}{save_id}"


def _in_data_dir(plan: SavePlan, data_dir: str) -> SavePlan:
    """``plan`` with every array stored under ``data_dir/`` (the one place it is added)."""
    arrays = {path: dataclasses.replace(meta, storage_path=f"{data_dir}/{meta.storage_path}")
              for path, meta in plan.arrays.items()}
    return dataclasses.replace(plan, arrays=arrays)


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
    chunks = {path: [i.chunk for i in items] for path, items in by_path.items()}
    by_path = {p: items for p, items in by_path.items() if p not in packed_paths}
    opens = {
        path: tsio.open_for_write(
            staged.kvstore_spec(plan.arrays[path].storage_path), plan.arrays[path],
            compression,
        )
        for path in by_path
    }
    writes = packer.write(staged, compression) if packer else []
    for path, items in by_path.items():
        array = tsio.wait(opens[path], timeout_secs=staged.timeout_secs,
                          what=f"opening array {path!r} in {staged.path}")
        for item in items:
            # The data outlives the write (jax.Arrays are immutable; async saves write
            # their own snapshot), so TensorStore may encode from it without a copy.
            writes.append(array[item.index].write(
                np.asarray(item.data), can_reference_source_data_indefinitely=True))
    # Wait for every write, even after one failed: the coordinator removes the staging
    # directory on failure, and a write still in flight would re-create it.
    tsio.wait_all(writes, timeout_secs=staged.timeout_secs, abandon_under=staged.path,
                  what=f"writing this process's chunks into {staged.path}")
    return chunks


def _check_manifests(plan: SavePlan, reports: list[dict], fingerprint: str,
                     cache: _manifest.CoordinatorCache) -> list | str:
    """(coordinator) Every chunk of every array written exactly once, by someone.

    Full manifests are checked chunk by chunk (`_manifest.check_coverage`); short ones
    (every process saved this plan before) must match the checked manifests cached for
    it, chunk counts and digests alike.

    Returns:
      Each process's packing report, or why the short manifests cannot be trusted
      (then every process sends its full manifest).
    Raises:
      CheckpointError: a process failed, or the chunks are not covered exactly once.
    """
    failures = [r["error"] for r in reports if "error" in r]
    if failures:
        raise CheckpointError("; ".join(failures))
    if all("chunks" in r for r in reports):
        _manifest.check_plans(fingerprint, reports)
        _manifest.check_coverage(plan.arrays, reports)
        return [r.get("packed") for r in reports]
    if not all("digest" in r for r in reports):
        return "some processes sent full manifests, others short ones"
    cached = cache.match(fingerprint, reports)
    return cached if isinstance(cached, str) else [c["packed"] for c in cached]


def _commit(target, staged, plan: SavePlan, object_graph, compression, comm,
            replaced=(), *, packed: _packing.PackedTable | None = None,
            user_metadata=None) -> None:
    """(coordinator) Zarr metadata, group nodes, metadata file, fsync, publish.

    ``packed``: where the small arrays were packed (their own ``zarr.json`` is not
    written: they are rows of the packed arrays, whose nodes are).
    ``user_metadata``: the caller's checked JSON dict, stored in the metadata file.
    ``replaced``: data directories of earlier saves to this object store prefix, which
    no committed metadata names once this save's metadata is written.
    """
    unpacked = [m for p, m in plan.arrays.items() if not (packed and packed.holds(p))]
    # Plain writes, not TensorStore's create-if-absent: see tsio.array_node.
    nodes = {f"{m.storage_path}/zarr.json": tsio.array_node(m, compression) for m in unpacked}
    nodes.update(_packing.array_nodes(packed, compression))
    tsio.write_files(staged.kvstore_spec(), nodes, timeout_secs=staged.timeout_secs,
                     abandon_under=staged.path,
                     what=f"writing the arrays' zarr.json in {staged.path}")
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
        user_metadata=user_metadata,
        packed=packed,
    )
    fsync_tree(staged.path)
    staged.write_bytes_atomic(METADATA_FILE, encode_metadata(meta))
    target.publish(staged)
    for name in replaced:  # no rename swapped them out (object stores): remove them
        target.remove(name)


@_gc_paused
def read_metadata(directory: str) -> CheckpointMetadata:
    """Reads and validates a committed checkpoint's metadata.

    Raises:
      CheckpointNotFoundError: nothing committed at ``directory``.
      CorruptCheckpointError: the metadata file is damaged or malformed.
    """
    storage = open_storage(directory)
    saving = None if storage.exists(METADATA_FILE) else wait_for_save_of(storage.path)
    if not storage.exists(METADATA_FILE):
        if saving is not None and saving.exception() is not None:
            raise CheckpointNotFoundError(
                f"No committed checkpoint at {directory!r}: this process's asynchronous "
                f"save of it failed ({_describe(saving.exception())}); sync() raises it")
        if storage.exists(STATE_FILENAME):
            raise CheckpointNotFoundError(_manager_directory_hint(directory))
        if storage.exists(_orbax.METADATA_FILE):
            return _orbax.read_orbax_metadata(storage, directory)
        items = _orbax.manager_step_items(storage)
        if items:
            raise CheckpointNotFoundError(
                f"{directory!r} is a step of an Orbax CheckpointManager; its items are "
                f"{items}: restore {os.path.join(directory, items[0])!r}")
        why = "no such directory"
        if storage.exists():
            try:
                found = sorted(storage.list_dir())
            except OSError:  # a file, not a directory
                found = []
            why = (f"it holds {found[:8] if found else 'nothing'}, and neither dcheckpoint's "
                   f"{METADATA_FILE} nor Orbax's {_orbax.METADATA_FILE}: an interrupted "
                   "save, or not a checkpoint")
        raise CheckpointNotFoundError(
            f"No committed checkpoint at {directory!r} ({why}); expected {METADATA_FILE}"
        )
    try:
        data = storage.read_bytes(METADATA_FILE, max_bytes=MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"Checkpoint {directory!r} was deleted while it was being read; expected "
            f"{METADATA_FILE}"
        ) from None
    return decode_metadata(data, source=os.path.join(directory, METADATA_FILE))


def _manager_directory_hint(directory: str) -> str:
    """A manager's directory holds checkpoints; name the one the caller probably meant."""
    try:
        latest = latest_checkpoint(directory)
    except CheckpointError:  # a damaged state file: still give the hint
        latest = None
    found = f" (now {latest!r})" if latest else "; it names no committed checkpoint yet"
    return (
        f"{directory!r} is a CheckpointManager's directory, not a checkpoint: pass one of "
        f"its checkpoints, e.g. dcheckpoint.latest_checkpoint({directory!r}){found}"
    )


@_gc_paused
def restore_arrays(
    directory: str,
    targets: Mapping[str, Any],
    *,
    metadata: CheckpointMetadata | None = None,
) -> dict[str, Any]:
    """Reads the arrays named in ``targets`` onto their target shardings.

    See `_read_arrays` for the arguments. A checkpoint replaced (or deleted) while it
    is being read makes the data its old metadata names disappear, never change
    (each save writes under its own data directory): that is reported as such.

    Raises:
      CheckpointNotFoundError: also when the checkpoint was replaced or deleted while
        being read (reading it again gives the new one).
    """
    metadata = metadata or read_metadata(directory)
    if isinstance(metadata, _orbax.OrbaxMetadata):
        return _orbax.read_arrays(metadata, dict(targets), str(directory))
    try:
        return _read_arrays(directory, targets, metadata=metadata)
    except (CheckpointNotFoundError, CorruptCheckpointError) as error:
        _raise_if_replaced(directory, metadata, error)
        raise


def _raise_if_replaced(directory: str, metadata: CheckpointMetadata, error: Exception) -> None:
    """Raises a clear error if ``directory`` no longer holds the save ``metadata`` read."""
    try:
        now = read_metadata(directory)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"Checkpoint {directory!r} was deleted while it was being read ({error})"
        ) from error
    except CheckpointError:
        return
    before = {path: meta.storage_path for path, meta in metadata.arrays.items()}
    if before != {path: meta.storage_path for path, meta in now.arrays.items()}:
        raise CheckpointNotFoundError(
            f"Checkpoint {directory!r} was replaced by another save while it was being "
            f"read, so the files its earlier metadata named are gone; read it again "
            f"({error})"
        ) from error


def _read_arrays(
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
    packed = {p: plans[p] for p in plans if metadata.packed and metadata.packed.holds(p)}
    unpacked = {p: plan for p, plan in plans.items() if p not in packed}
    check_restore(storage, directory, metadata, plans)  # before anything is allocated
    restored = _packing.restore(storage, metadata, packed, directory)
    opened = {
        path: tsio.open_for_read(
            storage.kvstore_spec(storage_rel(storage, metadata.arrays[path].storage_path)),
            metadata.arrays[path],
        )
        for path, (_, reads) in unpacked.items()
        if reads and metadata.arrays[path].nbytes
    }
    restore = _Restore(directory, metadata)
    for path, (sharding, reads) in unpacked.items():
        array = _result(opened[path], path, directory) if path in opened else None
        restore.add(path, sharding, reads, array)
    restored.update(restore.run())
    return {path: finish_read(metadata.arrays[path], targets[path], sharding,
                                restored[path])
            for path, (sharding, _) in plans.items()}


_WINDOW_VARIABLE = "DCHECKPOINT_READ_WINDOW_MIB"


def read_window() -> tuple[int, int]:
    """(bytes, reads) a restore keeps in flight at most.

    Bytes: 32 MiB per core, at least 256 MiB and at most 1 GiB, and never more than an
    eighth of the memory available now. 256 MiB is 32 reads of 8 MiB inner chunks,
    what TensorStore's 32 concurrent file calls (`_tensorstore.context`) can use (the
    64 MiB window this replaced left the disk idle between big chunks); more cores
    decode and copy more pieces at once, and on an accelerator a 16-core host keeps
    two 256 MiB slices going, so one slice's last pieces overlap the next one's reads.
    (A 256 MiB window there did not lower the host peak of a 4 GiB restore on an H200
    host, 1.78 GiB against 1.64 GiB: glibc's per-thread arenas hold most of it, see
    docs/PERFORMANCE.md.)
    Reads: two per core, 16 to 64, so small pieces still keep the cores and disk busy.
    ``DCHECKPOINT_READ_WINDOW_MIB`` sets the byte bound instead (an operator's knob for a
    host whose memory is tighter than this rule assumes).
    """
    cores = os.cpu_count() or 1
    window = min(max(256 << 20, (32 << 20) * cores), 1 << 30)
    window = number_from_env(_WINDOW_VARIABLE, window >> 20, parse=int,
                             valid=lambda mib: mib > 0,
                             expected="a positive whole number of MiB") << 20
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
        self.buffer = tsio.aligned_empty(tuple(s.stop - s.start for s in read.index), dtype)
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
    devices). A slice goes to its devices as soon as its last piece lands (to an
    accelerator through the transfer thread), and an array is built as soon as its
    last slice has (after the last read, for arrays copied to an accelerator).

    Memory: pieces in flight (TensorStore's buffers) stay within the window
    (`read_window`), and a new slice bound for an accelerator starts only while the
    host buffers of started and not yet copied ones total less than the window; so
    host memory beyond the restored arrays is bounded by about twice the window (plus
    one slice), not by the checkpoint. On CPU the host buffers become the device buffers (64-byte
    aligned, adopted without a copy); on accelerators they are freed once copied.
    """

    def __init__(self, directory: str, metadata: CheckpointMetadata):
        self.directory, self.metadata = directory, metadata
        self.pieces: list[tuple] = []  # (order key, slice, stored array, piece, local)
        self.shards: dict[str, list] = {}  # path -> device buffers so far
        self.targets: dict[str, tuple] = {}  # path -> (sharding, slices left)
        self.done: dict[str, Any] = {}
        # Copies to accelerators run here, in order, so the loop keeps issuing reads.
        self.transfers = cf.ThreadPoolExecutor(1, thread_name_prefix="dcheckpoint-h2d")
        self.copying: collections.deque = collections.deque()  # (future, buffer bytes)

    def add(self, path: str, sharding, reads, array) -> None:
        meta = self.metadata.arrays[path]
        if meta.nbytes == 0 or array is None:  # nothing stored: zero-size
            value = np.zeros(meta.shape, meta.dtype)
            self.done[path] = value if sharding is None else jax.device_put(value, sharding)
            return
        self.targets[path] = (sharding, len(reads))
        if sharding is not None:
            self.shards[path] = []
        grid = _piece_grid(array, meta)
        for read in reads:
            target = _Slice(path, read, meta.dtype)
            for piece, local in _chunk_pieces(read.index, grid):
                chunk = tuple(s.start // g for s, g in zip(piece, grid, strict=True))
                target.waiting += 1
                self.pieces.append(((len(self.targets), chunk), target, array, piece, local))
            if target.waiting == 0:  # a non-empty array's slice always has pieces
                raise AssertionError(f"restore of {path!r}: a slice with nothing to read")

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
                self._copied(wait_beyond=None)
                while groups and admits(groups[0]):
                    self._start(groups.popleft())
                self._land(*self.in_flight.pop(self._next_done()))
            for path in list(self.shards):  # arrays whose last copies went off the loop
                self._build(path)
        except BaseException:
            for future, *_ in self.in_flight.values():
                future.cancel()
            raise
        finally:
            self.transfers.shutdown(wait=True, cancel_futures=True)
        return self.done

    def _next_done(self) -> int:
        """The key of the next read to complete; bounded, as every storage wait is: a
        stalled object store fails the restore once no read has completed for the
        storage timeout, naming an array still waiting."""
        timeout = tsio.default_timeout_secs()
        try:
            return self.queue.get(timeout=timeout)
        except _queue.Empty:
            _, (_, group, _), _ = next(iter(self.in_flight.values()))
            raise tsio.timed_out(
                f"reading array {group[0][1].path!r} of {self.directory}", timeout) from None

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
            self._finish(target)  # a copied slice leaves `held` once its copy is done

    def _finish(self, target: _Slice) -> None:
        """Hands a complete slice to its devices; builds its array once all are there.

        A copy to an accelerator (pageable host memory to the device: 27.6 GB/s on an
        H200 host, issue 18, so ~10 ms per 256 MiB) runs on the transfer thread, so the
        reads of the next slices start meanwhile (4 GiB onto an H200: 2.70 s best of 4
        against 2.98 s with the copy inline). Its buffer counts in `held` until the
        copy is done, and at most two copies wait, so host memory stays within the
        window's bound. On CPU the device adopts the buffer: no copy, done here.
        """
        path, read = target.path, target.read
        sharding, left = self.targets[path]
        if sharding is None:
            self.done[path] = target.buffer
            return
        # The buffer was read for this call and nobody else holds it, so devices may
        # adopt it (on CPU it is not copied again); elsewhere device_put copies it.
        kind = getattr(sharding, "memory_kind", None)  # e.g. pinned_host for offloading
        put = functools.partial(
            jax.device_put, [target.buffer] * len(read.devices),
            [jax.sharding.SingleDeviceSharding(d, memory_kind=kind) for d in read.devices],
            may_alias=True)
        target.buffer = target.view = None
        if target.transient:
            self._copied(wait_beyond=1)  # so at most two wait, this one included
            self.copying.append((self.transfers.submit(put), target.nbytes))
            self.shards[path].append(self.copying[-1][0])
        else:
            self.shards[path].append(put())
        self.targets[path] = (sharding, left - 1)
        if left == 1 and not target.transient:
            self._build(path)

    def _copied(self, wait_beyond: int | None) -> None:
        """Releases the buffers of finished copies from `held` (they are freed once
        copied), first waiting for the oldest while more than ``wait_beyond`` wait."""
        while self.copying and (self.copying[0][0].done() or (
                wait_beyond is not None and len(self.copying) > wait_beyond)):
            future, nbytes = self.copying.popleft()
            future.result()
            self.held -= nbytes

    def _build(self, path: str) -> None:
        """The array of ``path`` from its device buffers (waiting for their copies)."""
        sharding, _ = self.targets[path]
        buffers = [b for part in self.shards.pop(path)
                   for b in (part.result() if isinstance(part, cf.Future) else part)]
        self.done[path] = jax.make_array_from_single_device_arrays(
            self.metadata.arrays[path].shape, sharding, buffers)


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


def _result(future, path: str, directory: str):
    try:  # bounded: a stalled object store must not hang a restore
        return tsio.wait(future, timeout_secs=tsio.default_timeout_secs(),
                         what=f"reading array {path!r} of {directory}")
    except errors.StorageTimeoutError:
        raise
    except (ValueError, RuntimeError, OSError) as e:
        raise _vanished_or(tsio.translate_error(e, array=path, where=directory),
                           directory) from e


def _vanished_or(error: CheckpointError, directory: str) -> CheckpointError:
    """``error``, or CheckpointNotFoundError when the whole checkpoint is gone.

    Retention deletes the metadata file first, so files that vanished under a reader
    whose checkpoint has no metadata file any more were deleted, not damaged.
    """
    if isinstance(error, errors.CorruptCheckpointError) and not is_committed(directory):
        return CheckpointNotFoundError(
            f"Checkpoint {directory!r} was deleted while it was being read (its "
            f"{METADATA_FILE} is gone; retention or another job removed it): {error}"
        )
    return error


def _table_digest(plan: SavePlan) -> str:
    """A short digest of every array's path, shape and dtype, compared across processes."""
    table = sorted([p, list(m.shape), dtype_name(m.dtype)] for p, m in plan.arrays.items())
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _preview(arrays: Mapping) -> str:
    names = sorted(arrays)
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"{names[:10]}{more}"
