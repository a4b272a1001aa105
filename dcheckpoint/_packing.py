"""Small arrays packed into one flat Zarr v3 array per process and dtype.

A durable file costs about a millisecond however small it is (write, fsync, directory
entry, later a directory fsync and an unlink), so a state of 10,000 leaves saved as one
Zarr array each spends its time on files, not bytes. Arrays whose chunks (saved shards)
are at most ``CheckpointOptions.pack_below_bytes`` are therefore packed: each process
concatenates the small shards it owns (replica 0, as for every chunk) per dtype, raveled
in C order, into one 1-D Zarr v3 array ``<root>/p<process>/<dtype>`` (root ``_packed``
unless a saved array already uses that name). Those are ordinary Zarr arrays with the
same codecs as every other array (crc32c per chunk of ``PACKED_CHUNK_BYTES``), so any
Zarr reader opens them; the metadata file's ``packed`` table says where each saved
chunk of each packed array lies:

    "packed": {"_packed/p0/float32": {"dtype": "float32", "size": 80, "chunk_size": 80,
                                      "members": [["model/b", 0, [0]], ["step", 64, []]]}}

Each member ``[array path, offset, chunk coordinates]`` is one saved chunk, ``prod(extent)``
elements from ``offset`` (a 64-byte boundary, see `_layout`) where extent is the
chunk's shape clipped to the array (see
docs/FORMAT.md for the reading recipe). The
choice over TensorStore's OCDBT kvstore and its measurements are in docs/FORMAT.md.

This module is the whole feature; the engine, verify and the metadata file call it
through small hooks (`Packer`, `table_from_reports`, `create_arrays`, `restore`,
`verify`, `PackedTable.from_json`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import os
from typing import Any

import jax
import numpy as np

from . import _tensorstore as tsio
from ._bounds import check_stored
from ._metadata import ArrayMetadata, dtype_from_name
from ._paths import check_storage_path
from ._storage import LocalStorage
from .errors import CheckpointError, CoordinationError, CorruptCheckpointError

__all__ = ["PACK_BELOW_BYTES", "PACKED_CHUNK_BYTES", "PackedArray", "Member", "PackedTable",
           "Packer", "table_from_reports", "array_nodes", "restore", "verify"]

PACK_BELOW_BYTES = 256 << 10  # default CheckpointOptions.pack_below_bytes
PACKED_CHUNK_BYTES = 1 << 20  # chunk of a packed array: the unit of checksum and read
# Fewer small arrays than this cost little as one directory each (tens of files), and
# then every array stays a plain Zarr array at its own path; more are packed.
PACK_MIN_ARRAYS = 64
_ROOT = "_packed"
_NAMED = 5  # arrays named in one error message


def packable(meta: ArrayMetadata, limit: int) -> bool:
    """Whether an array is small: every chunk of it has at most ``limit`` bytes."""
    return limit > 0 and math.prod(meta.chunk_shape) * meta.dtype.itemsize <= limit


def packed_paths(arrays: dict[str, ArrayMetadata], limit: int) -> set[str]:
    """The arrays a save packs: its small ones, if there are at least `PACK_MIN_ARRAYS`.

    Every process derives the same set from the same table of arrays.
    """
    small = {p for p, m in arrays.items() if packable(m, limit) and 0 not in m.shape}
    return small if len(small) >= PACK_MIN_ARRAYS else set()


def root_name(arrays: dict[str, ArrayMetadata]) -> str:
    """``_packed``, or ``_packed_<n>`` when a saved array's path starts with it.

    Every process derives the same name from the same table of arrays.
    """
    taken = {m.storage_path.split("/", 1)[0] for m in arrays.values()}
    return next(name for n in itertools.count()
                if (name := _ROOT if n == 0 else f"{_ROOT}_{n}") not in taken)


@dataclasses.dataclass(frozen=True)
class PackedArray:
    """One packed Zarr array: ``size`` elements of ``dtype`` in chunks of ``chunk_size``."""

    storage_path: str
    dtype: np.dtype
    size: int
    chunk_size: int

    @property
    def meta(self) -> ArrayMetadata:
        return ArrayMetadata(self.storage_path, (self.size,), self.dtype, (self.chunk_size,))

    def chunk_range(self, j: int) -> tuple[int, int]:
        return j * self.chunk_size, min((j + 1) * self.chunk_size, self.size)

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one saved chunk of a packed array lies."""

    packed: str  # storage path of the PackedArray
    offset: int
    chunk: tuple[int, ...]
    size: int  # elements: the chunk's extent clipped to the array (not stored)


@dataclasses.dataclass(frozen=True)
class PackedTable:
    """The ``packed`` section of the metadata file (validated when read)."""

    arrays: dict[str, PackedArray]
    members: dict[str, tuple[Member, ...]]  # logical path -> where its chunks lie

    def holds(self, path: str) -> bool:
        return path in self.members

    def root(self) -> str | None:
        return next((_root_of(p) for p in self.arrays), None)

    def to_json(self) -> dict:
        by_array: dict[str, list] = {name: [] for name in self.arrays}
        for path, members in self.members.items():
            for m in members:
                by_array[m.packed].append([path, m.offset, list(m.chunk)])
        return {
            name: {"dtype": a.dtype.name, "size": a.size, "chunk_size": a.chunk_size,
                   "members": sorted(by_array[name], key=lambda e: e[1])}
            for name, a in self.arrays.items()
        }

    @classmethod
    def from_json(cls, doc: Any, arrays: dict[str, ArrayMetadata], *,
                  source: str) -> PackedTable | None:
        """Parses and checks the table against the arrays (it may come from anywhere).

        Raises:
          CorruptCheckpointError: a malformed field, a member outside its packed array
            or overlapping another, or a packed array whose chunks are not each stored
            exactly once.
        """
        if doc is None:
            return None

        def bad(what: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"{source}: packed table: {what}")

        if not isinstance(doc, dict):
            raise bad("expected an object {packed array: its entry}")
        packed: dict[str, PackedArray] = {}
        found: dict[str, list[Member]] = {}
        for name, entry in doc.items():
            check_storage_path(name, array=name)
            if not isinstance(entry, dict) or not isinstance(entry.get("members"), list) \
                    or not _is_int(entry.get("size"), 1) \
                    or not _is_int(entry.get("chunk_size"), 1):
                raise bad(f"{name!r} needs integer 'size' and 'chunk_size' >= 1 and a "
                          "'members' list")
            array = packed[name] = PackedArray(
                name, dtype_from_name(entry.get("dtype"), array=name), entry["size"],
                entry["chunk_size"])
            end = 0  # members are sorted by offset and may not overlap
            for e in entry["members"]:
                path, offset, chunk = e if isinstance(e, list) and len(e) == 3 else (0, 0, 0)
                meta = arrays.get(path) if isinstance(path, str) else None
                if meta is None or not _is_int(offset, end) or not _chunk_in_grid(chunk, meta):
                    raise bad(f"{name!r}: malformed member {e!r} (an array of the "
                              "checkpoint, an offset after the previous member's end, a "
                              "chunk of its grid)")
                if meta.dtype != array.dtype:
                    raise bad(f"array {path!r} ({meta.dtype.name}) is packed into {name!r} "
                              f"({array.dtype.name})")
                size = _chunk_elements(meta, tuple(chunk))
                end = offset + size
                if end > array.size:
                    raise bad(f"array {path!r}: chunk {chunk} ends past the end of {name!r}")
                found.setdefault(path, []).append(Member(name, offset, tuple(chunk), size))
        if any(name.count("/") < 2 for name in packed):
            raise bad(f"packed array names must be <root>/p<process>/<dtype>, found "
                      f"{sorted(packed)[:3]}")
        roots = {_root_of(n) for n in packed}
        if len(roots) > 1:
            raise bad(f"packed arrays under several roots {sorted(roots)}")
        clash = [p for p, m in arrays.items()
                 if any(m.storage_path.startswith(r + "/") for r in roots)]
        if clash:
            raise bad(f"array {clash[0]!r} is stored inside the packed root {sorted(roots)}")
        for path, members in found.items():
            meta = arrays[path]
            grid = list(meta.chunk_grid)
            if len({m.chunk for m in members}) != len(members) or \
                    len(members) != math.prod(grid):
                raise bad(f"array {path!r}: {len(members)} chunks stored, expected each "
                          f"chunk of the grid {grid} once")
        return cls(packed, {p: tuple(ms) for p, ms in found.items()})


def _root_of(name: str) -> str:
    """The root directory of a packed array ``<root>/p<process>/<dtype>``."""
    return name.rsplit("/", 2)[0]


def _chunk_in_grid(chunk, meta: ArrayMetadata) -> bool:
    if not isinstance(chunk, list) or len(chunk) != len(meta.shape):
        return False
    if meta.chunk_shape == meta.shape:
        return all(type(i) is int and i == 0 for i in chunk)
    return all(_is_int(i, 0) and i < g for i, g in zip(chunk, meta.chunk_grid, strict=True))


def _chunk_elements(meta: ArrayMetadata, chunk: tuple[int, ...]) -> int:
    if meta.chunk_shape == meta.shape:
        return math.prod(meta.shape)
    return math.prod(_extent(meta, chunk))


def _is_int(value, minimum: int) -> bool:
    return type(value) is int and minimum <= value < 2**62


def _extent(meta: ArrayMetadata, chunk: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one saved chunk, clipped to the array's edge."""
    return tuple(min(c, s - i * c) for i, c, s in zip(chunk, meta.chunk_shape, meta.shape,
                                                     strict=True))


# -- save (every process) ----------------------------------------------------------------


class Packer:
    """This process's part of the packed arrays of one save.

    Args:
      plan: the save plan (the same table of arrays on every process).
      process_index: names this process's packed arrays ``<root>/p<index>/<dtype>``.
      limit: ``CheckpointOptions.pack_below_bytes``; 0 packs nothing.
      root: the packed arrays' directory (the engine's: ``<data dir>/_packed``);
        default `root_name` of the plan.
    """

    def __init__(self, plan, process_index: int, limit: int, *, root: str | None = None):
        self.limit = limit
        self.paths = packed_paths(plan.arrays, limit)
        root = root or root_name(plan.arrays)
        # By dtype in native byte order (a big-endian numpy value packs with the rest);
        # dtype.name is slow, so it is taken once per group.
        self._groups: dict[np.dtype, list] = {}
        native: dict[np.dtype, np.dtype] = {}
        for item in plan.writes:
            if item.path in self.paths:
                dtype = plan.arrays[item.path].dtype
                key = native.get(dtype) or native.setdefault(dtype, dtype.newbyteorder("="))
                self._groups.setdefault(key, []).append(item)
        self._names = {dt: f"{root}/p{process_index}/{dt.name}" for dt in self._groups}

    def holds(self, path: str) -> bool:
        return path in self.paths

    def write(self, staged, compression) -> list:
        """Starts one write per dtype; returns the futures (the caller waits)."""
        for items in self._groups.values():
            for item in items:  # every device-to-host copy in flight before the first wait
                if isinstance(item.data, jax.Array):
                    item.data.copy_to_host_async()
        futures = []
        for dtype, items in self._groups.items():
            offsets, size = _layout(items, dtype)
            flat = np.zeros(size, dtype)
            for item, offset in zip(items, offsets, strict=True):
                value = np.asarray(item.data).reshape(-1)
                flat[offset:offset + value.size] = value
            meta = _packed_array(self._names[dtype], flat.dtype, flat.size).meta
            array = tsio.open_for_write(staged.kvstore_spec(meta.storage_path), meta,
                                        compression).result()
            futures.append(array.write(flat, can_reference_source_data_indefinitely=True))
        return futures

    def report(self) -> dict:
        """The manifest's ``packed`` entry: the limit, and per dtype where each chunk lies."""
        out: dict[str, Any] = {"limit": self.limit, "arrays": {}}
        for dtype, items in self._groups.items():
            offsets, size = _layout(items, dtype)
            members = [[item.path, offset, list(item.chunk)]
                       for item, offset in zip(items, offsets, strict=True)]
            out["arrays"][self._names[dtype]] = {"dtype": dtype.name, "size": size,
                                                 "members": members}
        return out


def _layout(items, dtype: np.dtype) -> tuple[list[int], int]:
    """Where each chunk goes in its packed array (element offsets), and the array's size.

    Each chunk starts on a `tsio.CPU_ALIGN`-byte boundary (the gaps are zeros, at most
    63 bytes per chunk): a restore reads into an aligned buffer, so every chunk's view
    is aligned too and CPU devices adopt it without a copy. Readers only follow the
    offsets in the metadata, so older, unpadded checkpoints read the same way.
    """
    step = max(1, tsio.CPU_ALIGN // dtype.itemsize)
    offsets, offset = [], 0
    for item in items:
        offsets.append(offset)
        offset += -(-math.prod(s.stop - s.start for s in item.index) // step) * step
    return offsets, offset


def _packed_array(name: str, dtype: np.dtype, size: int) -> PackedArray:
    """Chunks of `PACKED_CHUNK_BYTES`, or one chunk of the whole array if it is smaller
    (Zarr stores an edge chunk at full size: 2 KiB of scalars would cost 1 MiB)."""
    chunk = max(1, PACKED_CHUNK_BYTES // np.dtype(dtype).itemsize)
    return PackedArray(name, np.dtype(dtype), size, max(1, min(chunk, size)))


# -- commit (coordinator) ------------------------------------------------------------------


def table_from_reports(plan, reports: list[dict]) -> PackedTable | None:
    """(coordinator) The packed table of a save, from every process's manifest.

    Chunk coverage is checked with every other chunk (packed chunks are in each
    manifest's ``chunks``); this checks that the processes packed the same arrays and
    that each packed chunk has exactly one place.

    Raises:
      CoordinationError: processes packed with different limits.
      CheckpointError: a packed chunk without a place, or with two.
    """
    limits = {r.get("packed", {}).get("limit", 0) for r in reports}
    if len(limits) > 1:
        raise CoordinationError(
            f"processes packed small arrays with different limits {sorted(limits)}; "
            "every process must save with the same CheckpointOptions.pack_below_bytes"
        )
    limit = limits.pop() if limits else 0
    paths = packed_paths(plan.arrays, limit)
    if not paths:
        return None
    arrays: dict[str, PackedArray] = {}
    members: dict[str, list[Member]] = {p: [] for p in paths}
    for r in reports:
        for name, part in r.get("packed", {}).get("arrays", {}).items():
            arrays[name] = _packed_array(name, dtype_from_name(part["dtype"], array=name),
                                         part["size"])
            for path, offset, chunk in part["members"]:
                size = _chunk_elements(plan.arrays[path], tuple(chunk))
                members[path].append(Member(name, offset, tuple(chunk), size))
    for path in paths:
        meta, found = plan.arrays[path], members[path]
        if meta.chunk_shape == meta.shape:  # one chunk (the usual): one place
            expected, ok = 1, len(found) == 1
        else:
            expected = math.prod(meta.chunk_grid)
            ok = len(found) == expected == len({m.chunk for m in found})
        if not ok:
            raise CheckpointError(
                f"Array {path!r}: expected {expected} packed chunks, one place each, "
                f"found {len(members[path])}"
            )
    return PackedTable(arrays, {p: tuple(ms) for p, ms in members.items()})


def array_nodes(table: PackedTable | None, compression) -> dict[str, bytes]:
    """(coordinator) Each packed array's ``zarr.json`` ({key: bytes}, see tsio.array_node)."""
    if table is None:
        return {}
    return {f"{a.storage_path}/zarr.json": tsio.array_node(a.meta, compression)
            for a in table.arrays.values()}


def group_paths(table: PackedTable | None) -> set[str]:
    """The Zarr groups above the packed arrays (``<data dir>/_packed/p0``, ...)."""
    if table is None:
        return set()
    return {"/".join(parts[:i]) for n in table.arrays
            for parts in [n.split("/")] for i in range(1, len(parts))}


# -- restore (every process) ---------------------------------------------------------------


_PIECE_BYTES = 8 << 20  # one read of a packed array; its arrays go to devices together


def restore(storage, metadata, plans: dict, directory: str) -> dict[str, Any]:
    """Reads packed arrays for ``plans`` ({path: (sharding or None, [ReadItem])}).

    Every packed file's wanted byte ranges are merged, cut into pieces of about
    `_PIECE_BYTES` at chunk boundaries and read together (all in flight at once). The
    pieces are taken in order: as soon as one is in, the arrays it completes are sliced
    out and sent to their devices in one batched ``jax.device_put``, while the later
    reads go on. So on an accelerator the host-to-device copies overlap the reads
    instead of following them (on the 2-core VM, where a transfer is an adoption and
    both cores are busy decoding, the overlap measured the same as one transfer at the
    end). The blocks are 64-byte aligned and so are the chunks in them (`_layout`), so
    CPU devices adopt each array's view without a copy.
    """
    if not plans:
        return {}
    table: PackedTable = metadata.packed
    # 1. The element ranges of the packed arrays that the reads need.
    wanted: dict[str, list[tuple[int, int]]] = {}
    pieces = []  # (path, read, [(member, size, chunk slices, dest slices)])
    for path, (_, reads) in plans.items():
        meta = metadata.arrays[path]
        by_chunk = {m.chunk: m for m in table.members[path]}
        for read in reads:
            parts = []
            for chunk, within, local in _overlaps(meta, read.index):
                member = by_chunk[chunk]
                wanted.setdefault(member.packed, []).append((member.offset,
                                                             member.offset + member.size))
                parts.append((member, member.size, within, local))
            pieces.append((path, read, parts))
    # 2. Every read in flight together, in pieces; `data` fills in as they arrive.
    for name in sorted(wanted):  # every packed file, before anything is read or allocated
        try:
            check_stored(storage, name, table.arrays[name].meta, directory)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(
                f"Packed {_list(_names_in(table, name, None))}, in {name!r}: {e}") from e
    reads = []  # (packed name, lo, hi, future, block), in the order they are awaited
    for name in sorted(wanted):
        array = _result(tsio.open_for_read(storage.kvstore_spec(_inside(storage, name)),
                                           table.arrays[name].meta), table, name, None,
                        directory)
        chunk = table.arrays[name].chunk_size
        step = max(chunk, _PIECE_BYTES // table.arrays[name].dtype.itemsize // chunk * chunk)
        for lo, hi in _merge(wanted[name], chunk):
            cuts = [lo, *range((lo // step + 1) * step, hi, step), hi]  # at chunk bounds
            reads.extend((name, a, b, *_read_aligned(array[a:b]))
                         for a, b in itertools.pairwise(cuts))
    data = {name: ([], []) for name in wanted}  # name: (starts, blocks) read so far
    # 3. Each piece of the restore waits for the last read it needs, then moves.
    starts: dict[str, list[int]] = {}  # packed name: where each of its reads starts
    for name, lo, *_ in reads:
        starts.setdefault(name, []).append(lo)
    order = {(name, lo): i for i, (name, lo, *_) in enumerate(reads)}
    due: dict[int, list] = {}  # read index: the pieces whose last needed read it is
    for piece in pieces:
        needed = max(order[(m.packed, _start_of(starts[m.packed], m.offset + m.size - 1))]
                     for m, _, _, _ in piece[2])
        due.setdefault(needed, []).append(piece)
    moved = _Moved(plans)
    try:
        for i, (name, lo, hi, future, block) in enumerate(reads):
            data[name][0].append(lo)
            read = _result(future, table, name, (lo, hi), directory)
            data[name][1].append(read if block is None else block)
            moved.send(metadata, data, due.pop(i, []))
    except BaseException:
        for *_, future, _ in reads:  # the failure is raised: no read outlives it
            future.cancel()
        raise
    return moved.arrays(metadata)


def _read_aligned(view) -> tuple[Any, np.ndarray | None]:
    """Starts reading ``view`` into a new aligned block: (future, block); (future of a
    new array, None) where TensorStore cannot write into numpy memory."""
    block = tsio.aligned_empty(view.shape, view.dtype.numpy_dtype)
    target = tsio.writable_view(block)
    return (view.read(), None) if target is None else (target.write(view), block)


def _start_of(starts: list[int], element: int) -> int:
    """The start of the read (of sorted ``starts``) that holds ``element``."""
    return starts[bisect.bisect_right(starts, element) - 1]


class _Moved:
    """The packed arrays of one restore, moved to their devices a batch at a time."""

    def __init__(self, plans: dict):
        self._plans = plans
        self._done: dict[str, Any] = {}  # path: final value
        self._shards: dict[str, list] = {}  # path: single-device arrays, for assembly

    def send(self, metadata, data, pieces) -> None:
        """Slices ``pieces`` out of ``data`` and sends them in one batched transfer."""
        values, targets, placed = [], [], []
        for path, read, parts in pieces:
            meta = metadata.arrays[path]
            value = _slice(meta, data, read, parts)
            sharding, reads = self._plans[path]
            if sharding is None:
                self._done[path] = value
            elif len(reads) == 1 and sharding.is_fully_addressable:
                # One read serves every device (one device, or replicated): device_put
                # makes the final array, no per-shard assembly. (Not across processes:
                # there device_put checks with a collective that all hold the same value.)
                values.append(_adoptable(value, read.devices) if len(read.devices) > 1
                              else value)  # one device: device_put's one copy is enough
                targets.append(sharding)
                placed.append((path, None))
            else:
                value = _adoptable(value, read.devices)
                kind = getattr(sharding, "memory_kind", None)  # e.g. pinned_host
                values.extend(value for _ in read.devices)
                targets.extend(jax.sharding.SingleDeviceSharding(d, memory_kind=kind)
                               for d in read.devices)
                placed.append((path, len(read.devices)))  # shards, assembled at the end
        if not values:
            return
        # The buffers are this call's own: devices may adopt them (CPU: no second copy,
        # and one buffer serves every device of a replicated array).
        out = iter(jax.device_put(values, targets, may_alias=True))
        for path, count in placed:
            if count is None:
                self._done[path] = next(out)
            else:
                self._shards.setdefault(path, []).extend(next(out) for _ in range(count))

    def arrays(self, metadata) -> dict[str, Any]:
        """Every planned array: assembled from its shards, or zeros if it has no reads."""
        out = {}
        for path, (sharding, _) in self._plans.items():
            meta = metadata.arrays[path]
            if path in self._done:
                out[path] = self._done[path]
            elif path in self._shards:
                out[path] = jax.make_array_from_single_device_arrays(
                    meta.shape, sharding, self._shards[path])
            elif sharding is None:
                out[path] = np.zeros(meta.shape, meta.dtype)
            else:  # zero-size
                out[path] = jax.device_put(np.zeros(meta.shape, meta.dtype), sharding)
        return out


def _slice(meta: ArrayMetadata, data, read, parts) -> np.ndarray:
    """One read's values, cut out of the packed blocks read so far."""
    shape = tuple(s.stop - s.start for s in read.index)
    if len(parts) == 1 and parts[0][1] == math.prod(shape):
        member, size, _, _ = parts[0]  # the read is one whole chunk: a view, no copy
        return _flat(data, member, size).reshape(shape)
    value = tsio.aligned_empty(shape, meta.dtype)
    for member, size, within, local in parts:
        value[local] = _flat(data, member, size).reshape(_extent(meta, member.chunk))[within]
    return value


def _adoptable(value: np.ndarray, devices) -> np.ndarray:
    """``value`` in a buffer a CPU device can adopt without copying (64-byte aligned).

    Chunks are aligned in the packed arrays since they are padded (`_layout`), so this
    copies only for checkpoints written before, and for a chunk that crosses a read
    block: one copy here replaces a copy per device. Other platforms copy to the
    device anyway.
    """
    if not devices or devices[0].platform != "cpu" or value.ctypes.data % tsio.CPU_ALIGN == 0:
        return value
    out = tsio.aligned_empty(value.shape, value.dtype)
    np.copyto(out, value)
    return out


def _inside(storage, name: str) -> str:
    storage.resolve_inside(name)
    return name


def _overlaps(meta: ArrayMetadata, index) -> list:
    """The saved chunks a global slice touches: [(chunk, slice in chunk, slice in read)]."""
    if meta.chunk_shape == meta.shape and all(s.start == 0 for s in index):
        return [((0,) * len(index), index, index)]  # one chunk, read whole (the usual)
    per_dim = []
    for s, c in zip(index, meta.chunk_shape, strict=True):
        dim = []
        for k in range(s.start // c, -(-s.stop // c)):
            lo, hi = max(s.start, k * c), min(s.stop, (k + 1) * c)
            dim.append((k, slice(lo - k * c, hi - k * c), slice(lo - s.start, hi - s.start)))
        per_dim.append(dim)
    return [(tuple(d[0] for d in combo), tuple(d[1] for d in combo),
             tuple(d[2] for d in combo)) for combo in itertools.product(*per_dim)]


def _merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted ranges joined where they are less than ``gap`` elements apart."""
    merged: list[list[int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def _flat(data, member: Member, size: int) -> np.ndarray:
    """A member's elements: a view of one block, or joined where it crosses into the next."""
    starts, blocks = data[member.packed]
    i = bisect.bisect_right(starts, member.offset) - 1
    lo = member.offset - starts[i]
    if lo + size <= len(blocks[i]):
        return blocks[i][lo:lo + size]
    parts, need = [], size
    while need:
        part = blocks[i][lo:lo + need]
        parts.append(part)
        need, lo, i = need - len(part), 0, i + 1
    return np.concatenate(parts)


def _result(future, table: PackedTable, name: str, span, directory: str):
    try:
        return future.result()
    except (ValueError, RuntimeError, OSError) as e:
        names = _names_in(table, name, span)
        error = tsio.translate_error(e, array=names[0] if names else name, where=directory)
        raise type(error)(f"{error}; packed file {name!r} holds {_list(names)}") from e


def _names_in(table: PackedTable, name: str, span) -> list[str]:
    """Arrays with a chunk in elements ``span`` of packed array ``name`` (None: any)."""
    lo, hi = span or (0, table.arrays[name].size)
    found = sorted((m.offset, path) for path, members in table.members.items()
                   for m in members
                   if m.packed == name and m.offset < hi and m.offset + m.size > lo)
    return list(dict.fromkeys(path for _, path in found))


def _list(names: list[str]) -> str:
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return f"arrays {names[:_NAMED]}{more}"


# -- verify --------------------------------------------------------------------------------

_READ_WINDOW = 16
_CRC32C_BYTES = 4


def verify(storage, metadata, advance) -> tuple[list[tuple], int, int]:
    """Checks every packed array: zarr.json, chunk files, sizes and checksums.

    A failed chunk is reported under the first array it holds, naming the others.

    Returns:
      ([(array, file, message)], chunk files checked, bytes read).
    """
    table: PackedTable | None = metadata.packed
    if table is None:
        return [], 0, 0
    problems: list[tuple] = []
    chunks = nbytes = 0
    per_array = {}
    for members in table.members.values():
        for m in members:
            per_array[m.packed] = per_array.get(m.packed, 0) + 1
    for name in sorted(table.arrays):
        packed = table.arrays[name]
        c, n = _verify_one(storage, table, packed, problems)
        chunks, nbytes = chunks + c, nbytes + n
        advance(per_array.get(name, 0))
    return problems, chunks, nbytes


def _verify_one(storage, table, packed: PackedArray, problems) -> tuple[int, int]:
    name = packed.storage_path

    def problem(span, file, message):
        names = _names_in(table, name, span)
        problems.append((names[0] if names else None, file,
                         f"{message} (packed file {name!r} holds {_list(names)})"))

    try:
        storage.resolve_inside(name)
        array = tsio.open_for_read(storage.kvstore_spec(name), packed.meta).result()
    except CorruptCheckpointError as e:
        problem(None, name, str(e))
        return 0, 0
    except Exception as e:  # noqa: BLE001 (reported, never raised)
        problem(None, f"{name}/zarr.json", str(tsio.translate_error(e, array=name,
                                                                     where=storage.path)))
        return 0, 0
    zarr_meta = array.spec().to_json()["metadata"]
    stored = zarr_meta["chunk_grid"]["configuration"]["chunk_shape"]
    if stored != [packed.chunk_size]:
        problem(None, f"{name}/zarr.json",
                f"chunk shape {stored}, expected [{packed.chunk_size}] from the metadata")
        return 0, 0
    raw_size = None
    if [c["name"] for c in zarr_meta["codecs"]] == ["bytes", "crc32c"]:
        raw_size = packed.chunk_size * packed.dtype.itemsize + _CRC32C_BYTES
    present = set(storage.list_files(name))
    expected = [f"c/{j}" for j in range(packed.chunk_count)]
    for rel in sorted(present - set(expected) - {"zarr.json"}):
        problem(None, f"{name}/{rel}", "unexpected file: not a chunk of the packed array")
    chunks = nbytes = 0
    window = []

    def collect():
        nonlocal chunks
        for j, rel, future in window:
            try:
                future.result()
                chunks += 1
            except Exception as e:  # noqa: BLE001 (reported, never raised)
                problem(packed.chunk_range(j), rel, str(tsio.translate_error(
                    e, array=name, where=storage.path)))
        window.clear()

    for j, rel in enumerate(expected):
        full = f"{name}/{rel}"
        if rel not in present:
            problem(packed.chunk_range(j), full, "missing chunk file")
            continue
        if isinstance(storage, LocalStorage):
            size = os.path.getsize(storage.join(full))
            if raw_size is not None and size != raw_size:
                problem(packed.chunk_range(j), full,
                        f"chunk file is {size} bytes, expected {raw_size} (truncated or padded)")
                continue
            nbytes += size
        else:
            nbytes += raw_size or packed.chunk_size * packed.dtype.itemsize
        lo, hi = packed.chunk_range(j)
        window.append((j, full, array[lo:hi].read()))
        if len(window) >= _READ_WINDOW:
            collect()
    collect()
    return chunks, nbytes
