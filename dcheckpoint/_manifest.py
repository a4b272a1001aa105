"""Save manifests that stay small at thousands of processes, and the coordinator's check.

A manifest says which chunks of which arrays one process wrote. Listing every chunk
(``[[path, [i, j]], ...]``) costs the coordinator of a 1,024-process job 100 MiB and
seconds of Python per save. Two things keep it small:

* **Ranges** (every save). Arrays are numbered by their place in the sorted array table
  (the same on every process: the save's identity step compared it), and a process's
  chunks of one array are almost always a product of arithmetic progressions, one per
  dimension (a regular sharding: ``[[8p, 8p+8, 1], [0, 1, 1]]``). Arrays with the same
  chunk set are one *group*, ``[runs of array numbers, chunks]``, where chunks is
  ``["r", [[start, stop, step], ...]]`` or, for an irregular set, the explicit list
  ``["l", [[i, j], ...]]``. An FSDP-like state of 1,000 arrays is a handful of groups
  per process. `check_coverage` then proves every chunk of every array was written
  exactly once with a few numpy operations per group, not a loop over chunks.
* **Steady state** (a save whose plan matches the previous one). Each process keeps
  the fingerprint of the plan it last saved successfully (`plan_fingerprint`: the array
  table with chunk shapes, and the process count); when the new plan has the same
  fingerprint it sends only the fingerprint, its chunk count and a digest of the full
  manifest it would have sent (`digest`). The coordinator holds the full manifests it
  checked for that fingerprint (`CoordinatorCache`) and accepts the save only when
  every process's fingerprint, count and digest equal the cached ones: the coverage it
  proved then holds again, chunk for chunk. Any difference (a changed plan, a process
  without a cache, another digest) makes every process send its full manifest in the
  same save (`RESEND`). A changed plan is detected, never trusted.

Nothing here does I/O or communicates; the engine calls it (`_engine.write_and_commit`).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._metadata import ArrayMetadata, dtype_name
from .errors import CheckpointError, CoordinationError

__all__ = ["RESEND", "plan_fingerprint", "encode_chunks", "digest",
           "check_coverage", "check_plans", "ProcessCache", "CoordinatorCache", "caches_for"]

RESEND = "resend"  # the coordinator's answer asking every process for its full manifest
_CACHED_PLANS = 4  # plans remembered per communicator (a manager and an exporter alternate)
_NAMED = 3  # chunks named in one error message


def plan_fingerprint(arrays: Mapping[str, ArrayMetadata], process_count: int) -> str:
    """A digest of everything a steady-state save must share with the cached one.

    The array table (paths, storage paths, shapes, dtypes, chunk shapes) and the process
    count. Which process writes which chunk is not in it: that is in each process's
    manifest digest, which the coordinator compares too.
    """
    table = [[p, m.storage_path, list(m.shape), dtype_name(m.dtype), list(m.chunk_shape)]
             for p, m in sorted(arrays.items())]
    return hashlib.sha256(json.dumps([process_count, table]).encode()).hexdigest()[:32]


def encode_chunks(order: Sequence[str], chunks: Mapping[str, Sequence[Sequence[int]]]
                  ) -> tuple[list, int]:
    """This process's chunks as groups; returns (groups, number of chunks).

    Args:
      order: every array's path in the array table's sorted order (numbers arrays).
      chunks: {path: chunk coordinates this process wrote}; paths not in ``order`` are
        a bug of the caller (KeyError).
    """
    number = {path: i for i, path in enumerate(order)}
    by_set: dict[tuple, list[int]] = {}
    count = 0
    for path, coords in chunks.items():
        if not coords:
            continue
        count += len(coords)
        key = tuple(tuple(c) for c in coords)
        by_set.setdefault(key, []).append(number[path])
    groups = [(min(indices), [_arrays(sorted(indices), len(order)), _describe(key)])
              for key, indices in by_set.items()]
    return [g for _, g in sorted(groups, key=lambda g: g[0])], count


def _arrays(indices: list[int], total: int) -> list | str:
    """A group's array numbers: runs, or a bitmap (base64) where runs would be longer
    (arrays of one kind interleaved with others: every layer's weights, say)."""
    runs = _runs(indices)
    bitmap_chars = 4 * math.ceil(math.ceil(total / 8) / 3)
    if len(runs) <= 4 or 12 * len(runs) < bitmap_chars:
        return runs
    bits = np.zeros(total, dtype=bool)
    bits[indices] = True
    return base64.b64encode(np.packbits(bits).tobytes()).decode()


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted distinct integers as half-open runs [[start, stop], ...]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _describe(coords: tuple[tuple[int, ...], ...]) -> list:
    """``["r", ranges]`` when ``coords`` is exactly a product of progressions, else
    ``["l", coords]``."""
    ndim = len(coords[0])
    if ndim == 0:
        return ["r", []] if len(coords) == 1 else ["l", [list(c) for c in coords]]
    if len(coords) == 1:
        return ["r", [[c, c + 1, 1] for c in coords[0]]]
    array = np.asarray(coords, dtype=np.int64)
    ranges = []
    for d in range(ndim):
        values = np.unique(array[:, d])
        steps = np.diff(values)
        if len(values) > 1 and not np.all(steps == steps[0]):
            return ["l", [list(c) for c in coords]]
        step = int(steps[0]) if len(values) > 1 else 1
        ranges.append([int(values[0]), int(values[-1]) + 1, step])
    size = math.prod(len(range(*r)) for r in ranges)
    # Every coordinate lies in the product; as many distinct ones as it has: equal.
    if size != len(coords) or len(set(coords)) != len(coords):
        return ["l", [list(c) for c in coords]]
    return ["r", ranges]


def _decode_chunks(chunks: Any) -> list | np.ndarray:
    """A group's chunks: its ranges (checked), or an (n, ndim) array of coordinates.

    Raises:
      ValueError: malformed (the caller names the process).
    """
    if not (isinstance(chunks, list) and len(chunks) == 2 and chunks[0] in ("r", "l")
            and isinstance(chunks[1], list)):
        raise ValueError(f"chunks must be ['r', ranges] or ['l', list], found {_clip(chunks)}")
    kind, body = chunks
    if kind == "r":
        for r in body:
            if not (isinstance(r, list) and len(r) == 3 and all(_is_int(x) for x in r)
                    and r[2] >= 1 and r[0] < r[1]):
                raise ValueError(f"a range must be [start, stop, step >= 1], found {_clip(r)}")
        return body
    if not body or not all(isinstance(c, list) and all(_is_int(x) for x in c) for c in body):
        raise ValueError(f"a chunk list must hold integer coordinates, found {_clip(body)}")
    if len({len(c) for c in body}) != 1:
        raise ValueError("the coordinates of a chunk list have different lengths")
    return np.asarray(body, dtype=np.int64).reshape(len(body), len(body[0]))


def _array_numbers(arrays: Any) -> np.ndarray:
    """The array numbers of a group's runs or bitmap (see `_arrays`), vectorised."""
    if isinstance(arrays, str):
        try:
            bits = np.unpackbits(np.frombuffer(base64.b64decode(arrays, validate=True),
                                               dtype=np.uint8))
        except ValueError as e:
            raise ValueError(f"an array bitmap must be base64, found {_clip(arrays)}") from e
        indices = np.flatnonzero(bits)
        if not indices.size:
            raise ValueError("an array bitmap names no array")
        return indices
    runs = np.asarray(arrays) if isinstance(arrays, list) and arrays else None
    if (runs is None or runs.ndim != 2 or runs.shape[1] != 2 or runs.dtype.kind != "i"
            or np.any(runs[:, 0] < 0) or np.any(runs[:, 1] <= runs[:, 0])):
        raise ValueError(f"array runs must be [[start, stop), ...], found {_clip(arrays)}")
    lengths = runs[:, 1] - runs[:, 0]
    starts = np.repeat(runs[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(int(lengths.sum()), dtype=np.int64)


def _is_int(x: Any) -> bool:
    return type(x) is int


def _clip(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def digest(body: Mapping[str, Any]) -> str:
    """A digest of what a process wrote: its full manifest's chunks, count and packing."""
    text = json.dumps([body.get("chunks"), body.get("count"), body.get("packed")],
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_coverage(arrays: Mapping[str, ArrayMetadata], manifests: Sequence[Mapping]) -> None:
    """(coordinator) Proves every chunk of every array was written exactly once.

    ``manifests`` are the full manifests in process order (``"chunks"``: groups, see
    the module docstring; ``"count"``: chunks claimed). One counter per chunk of the
    save (uint8), incremented per group and grid with one fancy-indexed add; the total
    number of writes is counted exactly too, so a counter that wrapped cannot pass.

    Raises:
      CheckpointError: a chunk missing, written twice or outside its array's grid, or
        a malformed manifest; the message names the array (and process) and chunks.
    """
    coverage = _Coverage(arrays)
    total = 0
    for process, manifest in enumerate(manifests):
        try:
            total += coverage.add(manifest)
        except ValueError as e:
            raise CheckpointError(f"Process {process} sent a malformed manifest: {e}") from e
    counter = coverage.counter
    if total != counter.size or not np.all(counter == 1):
        raise CheckpointError(_coverage_problem(counter, coverage.offsets, coverage.grids,
                                                coverage.order, total))


class _Coverage:
    """The chunk counters of one save, and the array sets its groups name, decoded once
    (the processes of a regular job send the same array sets, with other chunks)."""

    def __init__(self, arrays: Mapping[str, ArrayMetadata]):
        self.order = sorted(arrays)
        self.grids = [arrays[p].chunk_grid for p in self.order]
        sizes = np.array([math.prod(g) for g in self.grids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.counter = np.zeros(int(self.offsets[-1]), dtype=np.uint8)
        ids: dict[tuple, int] = {}
        self.grid_of = np.array([ids.setdefault(g, len(ids)) for g in self.grids],
                                dtype=np.int64)
        self.grid_list = list(ids)
        self._sets: dict[str, tuple[np.ndarray, list]] = {}

    def _members(self, arrays: Any) -> tuple[np.ndarray, list]:
        """(array numbers, [(grid, their counter offsets, first path)]) of an array set."""
        key = arrays if isinstance(arrays, str) else json.dumps(arrays)
        found = self._sets.get(key)
        if found is None:
            indices = _array_numbers(arrays)
            if indices.max() >= len(self.order):
                raise ValueError(f"array number {int(indices.max())} but the save has "
                                 f"{len(self.order)} arrays")
            kinds = self.grid_of[indices]
            by_grid = [(self.grid_list[int(g)], self.offsets[indices[kinds == g]],
                        self.order[int(indices[kinds == g][0])]) for g in np.unique(kinds)]
            found = self._sets[key] = (indices, by_grid)
        return found

    def add(self, manifest: Mapping) -> int:
        """Counts one process's groups; returns the writes counted."""
        groups = manifest.get("chunks")
        if not isinstance(groups, list):
            raise ValueError(f"'chunks' must be a list of groups, found {_clip(groups)}")
        seen = np.zeros(len(self.order), dtype=bool)
        added = 0
        for group in groups:
            if not (isinstance(group, list) and len(group) == 2):
                raise ValueError(f"a group must be [arrays, chunks], found {_clip(group)}")
            indices, by_grid = self._members(group[0])
            if seen[indices].any():
                twice = indices[seen[indices]]
                raise ValueError(f"array {self.order[int(twice[0])]!r} is in more than one group")
            seen[indices] = True
            chunks = _decode_chunks(group[1])
            for grid, offsets, path in by_grid:
                flat = _flat_chunks(chunks, grid, path)
                where = (offsets[:, None] + flat[None, :]).ravel()
                if isinstance(chunks, np.ndarray) and np.unique(flat).size != flat.size:
                    np.add.at(self.counter, where, 1)  # a list naming a chunk twice
                else:
                    self.counter[where] += 1  # distinct places: one vectorised add
                added += where.size
        claimed = manifest.get("count")
        if claimed != added:
            raise ValueError(f"it claims {claimed!r} chunks but lists {added}")
        return added


def _flat_chunks(chunks, grid: tuple[int, ...], path: str) -> np.ndarray:
    """Flat (C order) chunk numbers within ``grid``; refuses chunks outside it."""
    if isinstance(chunks, list):  # ranges
        if len(chunks) != len(grid):
            raise ValueError(f"array {path!r}: ranges of rank {len(chunks)}, grid {grid}")
        flat = np.zeros(1, np.int64)
        for (start, stop, step), n in zip(chunks, grid, strict=True):
            if start < 0 or stop > n:
                raise ValueError(f"array {path!r}: chunks {start}..{stop - 1} outside its "
                                 f"grid {grid}")
            flat = (flat[:, None] * n + np.arange(start, stop, step, dtype=np.int64)).ravel()
        return flat
    if chunks.shape[1] != len(grid):
        raise ValueError(f"array {path!r}: chunk coordinates of rank {chunks.shape[1]}, "
                         f"grid {grid}")
    if chunks.shape[1] == 0:
        return np.zeros(chunks.shape[0], np.int64)  # a scalar's one chunk, maybe repeated
    bad = np.any((chunks < 0) | (chunks >= np.asarray(grid)), axis=1)
    if bad.any():
        raise ValueError(f"array {path!r}: chunk {chunks[bad][0].tolist()} outside its "
                         f"grid {grid}")
    return np.ravel_multi_index(chunks.T, grid)


def _coverage_problem(counter, offsets, grids, order, total) -> str:
    bad = np.flatnonzero(counter != 1)
    if bad.size == 0:  # every counter 1 but more writes: a counter wrapped past 255
        return (f"{total} chunk writes reported for {counter.size} chunks: some chunk was "
                "written more than once")
    first = int(np.searchsorted(offsets, bad[0], side="right")) - 1
    lo, hi = int(offsets[first]), int(offsets[first + 1])
    local = counter[lo:hi]
    missing, twice = np.flatnonzero(local == 0), np.flatnonzero(local > 1)

    def named(flat) -> list:
        return [list(map(int, np.unravel_index(int(f), grids[first])))
                for f in flat[:_NAMED]]

    return (f"Array {order[first]!r}: expected {hi - lo} chunks written once each; "
            f"{missing.size} missing (first: {named(missing)}), {twice.size} written more "
            f"than once (first: {named(twice)})")


class ProcessCache:
    """(every process) Digests of the plans this process saved successfully.

    ``fingerprint -> digest`` of the full manifest then sent; a save whose plan has a
    remembered fingerprint sends the short manifest.
    """

    def __init__(self):
        self._saved: collections.OrderedDict[str, str] = collections.OrderedDict()

    def knows(self, fingerprint: str) -> bool:
        return fingerprint in self._saved

    def remember(self, fingerprint: str, manifest_digest: str) -> None:
        self._saved[fingerprint] = manifest_digest
        self._saved.move_to_end(fingerprint)
        while len(self._saved) > _CACHED_PLANS:
            self._saved.popitem(last=False)

    def forget(self, fingerprint: str) -> None:
        self._saved.pop(fingerprint, None)


class CoordinatorCache:
    """(coordinator) The checked full manifests of recent plans, by fingerprint.

    For each: every process's digest and count, and its packing report (the packed
    table of a steady save is rebuilt from it).
    """

    def __init__(self):
        self._plans: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()

    def remember(self, fingerprint: str, manifests: Sequence[Mapping]) -> None:
        self._plans[fingerprint] = [
            {"digest": digest(m), "count": m.get("count"), "packed": m.get("packed")}
            for m in manifests]
        self._plans.move_to_end(fingerprint)
        while len(self._plans) > _CACHED_PLANS:
            self._plans.popitem(last=False)

    def forget(self, fingerprint: str) -> None:
        self._plans.pop(fingerprint, None)

    def match(self, fingerprint: str, short: Sequence[Mapping]) -> list[dict] | str:
        """The cached entries if every short manifest matches them, else why not."""
        cached = self._plans.get(fingerprint)
        if cached is None:
            return "the coordinator has no checked manifests for this plan"
        if len(cached) != len(short):
            return f"{len(short)} processes, {len(cached)} in the cached plan"
        for process, (mine, theirs) in enumerate(zip(cached, short, strict=True)):
            if theirs.get("plan") != fingerprint:
                return f"process {process} has another plan"
            if theirs.get("digest") != mine["digest"] or theirs.get("count") != mine["count"]:
                return f"process {process} wrote other chunks than in the cached plan"
        return cached


def check_plans(fingerprint: str, manifests: Sequence[Mapping]) -> None:
    """(coordinator) Every full manifest was made for the coordinator's plan.

    Raises:
      CoordinationError: a process planned other chunk shapes (the identity step
        compared paths, shapes and dtypes only).
    """
    other = [p for p, m in enumerate(manifests) if m.get("plan") != fingerprint]
    if other:
        raise CoordinationError(
            f"processes {other} planned other chunk shapes than the coordinator (the "
            "arrays' shardings differ between processes); every process must save the "
            "same arrays with the same shardings")


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def caches_for(comm: Any) -> tuple[ProcessCache, CoordinatorCache]:
    """This process's caches for the job of ``comm`` (one pair per communicator: a new
    communicator is a new job, whose first save sends full manifests)."""
    pair = _caches.get(comm)
    if pair is None:
        pair = _caches[comm] = (ProcessCache(), CoordinatorCache())
    return pair
