"""The local tier: fast saves to each host's own disk or tmpfs, with a copy on a peer.

A local save writes this process's replica-0 shards ("pieces", each named by its array
path and global index, never by a process id) under ``<local dir>/step-<N>/own/``, and
keeps the copy of a peer's pieces, sent to it point to point, under ``peer/``. Who
copies to whom follows the failure domains (`peer_map`: the host name by default; in
a job on one machine, process ``p`` sends to ``(p + 1) % n``), so losing any one
domain's directories loses no piece. Files: `_local_format`. Protocol of one save,
with roles:

  1. (all, caller's thread) plan and snapshot this process's shards to host memory;
     the rest runs on the collectives thread, in the job's one order of collectives.
  2. (all) send own pieces to the peer and receive those of whoever sends here
     (memory to memory); write both copies (raw bytes, a checksum each).
  3. (all) report success and this process's per-process values to the coordinator;
     (coordinator) if every process wrote both copies, commit: a save id and time.
  4. (all) write ``metadata.json`` (every process's values in its graph), then
     ``COMMITTED`` (the id), atomically; then apply retention locally.

A step without ``COMMITTED`` (a save killed midway) is never restored from. Nothing is
fsynced: the tier survives the death of processes, not of the host (tmpfs would not
survive a reboot anyway); the persistent tier is for that.

Restore (`LocalTier.open`, then `LocalRestore.read`; all processes):
  1. (all) send the coordinator an inventory: every committed step ``>= min_step`` held
     locally, with the pieces (own and peer copies) and each array's element count.
  2. (coordinator) choose the newest (step, save) whose held pieces cover every
     element of every array; else none, with the reason. (all) get the metadata from
     a holder if this directory lacks the step (a replaced host).
  3. (all) plan reads for the restore target's sharding (any mesh, any process
     count) and send the pieces they need; (coordinator) assign each one to a holder:
     the requester itself when it has a copy, else the least loaded holder.
  4. (all) read and verify (checksum) the pieces they serve; a bad copy is reported,
     dropped, and the assignment made again without it; a step whose needed piece has
     no good copy left is given up (`LocalStepUnusable`), never partly restored.
  5. (all) send the served pieces point to point, then build each target slice from
     the pieces that overlap it. Pieces of one save only: steps are never mixed.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np

from . import _tensorstore as tsio
from ._comm import Communicator, agree, default_communicator, run_ordered, submit
from ._engine import snapshot
from ._local_format import (
    COMMITTED,
    IO_THREADS,
    KINDS,
    METADATA,
    STEP_PREFIX,
    bounds_of,
    map_piece,
    piece_key,
    read_bytes,
    read_json,
    step_of,
    verify,
    write_atomic,
    write_copies,
)
from ._metadata import CheckpointMetadata, decode_metadata, encode_metadata
from ._options import CheckpointOptions
from ._plan import SavePlan, finish_read, plan_read, plan_save, record_process_values
from .errors import CheckpointError

__all__ = ["LocalTier", "LocalRestore", "LocalStepUnusable", "peer_map"]

logger = logging.getLogger(__name__)



class _Phases:
    """Seconds per phase of one save or restore, for its log line."""

    def __init__(self):
        self._last = self.started = time.perf_counter()
        self.spent: list[str] = []

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent.append(f"{phase} {now - self._last:.3f}")
        self._last = now

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.started:.3f} s ({', '.join(self.spent)})"


class LocalStepUnusable(CheckpointError):
    """The chosen local step lost a piece it needs (bad checksums); open another."""
















class LocalTier:
    """The local tier of one job: a node-local directory per process (see module doc).

    Args:
      directory: this process's node-local directory (tmpfs or local disk). It belongs
        to the host, not to a rank: a restarted job may give it to another rank.
      run: names the job whose steps these are (a manager passes its persistent
        directory): steps another run left in the directory are never restored.
      failure_domain: what this process fails with (default: its host name; a rack
        name where whole racks fail): the peer copy goes to another domain whenever
        there is one (see `peer_map`).
      max_to_keep: committed local steps kept in each directory.
      comm: the job's communicator (default: `default_communicator`).
      timeout_secs: bound on every wait of the protocol.
    """

    def __init__(self, directory, *, max_to_keep: int = 2, comm: Communicator | None = None,
                 timeout_secs: float | None = None, failure_domain: str | None = None,
                 run: str | None = None):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"local_max_to_keep must be a positive int, got {max_to_keep!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.run = run
        self._comm = comm or default_communicator()
        if not self._comm.supports_exchange:
            raise ValueError(
                f"the local tier sends peer copies point to point, which "
                f"{type(self._comm).__name__} cannot: start the job under mpiexec and "
                "call launch.initialize() (the MPI communicator)")
        self._timeout = timeout_secs or CheckpointOptions().timeout_secs
        # Collective (all processes construct it at the same point): every process
        # learns every failure domain, so each knows whom it sends to and hears from.
        domain = str(socket.gethostname() if failure_domain is None else failure_domain)
        domains = run_ordered(lambda: agree(
            self._comm, domain, lambda ds: ds, kind="local tier start",
            tag="local tier start (failure domains)", timeout_secs=self._timeout))
        self.peer_of = peer_map(domains)
        self._pending: Future | None = None
        self._bad: set[tuple[str, str, str]] = set()  # (save id, piece key, kind) failed
        # The peer's pieces land here, save after save: warm pages, no allocation.
        self._peer_buffers: list[np.ndarray] = []
        os.makedirs(self.directory, exist_ok=True)

    # -- saving ---------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        """The committed steps in this process's directory (its own view), oldest first."""
        return sorted(step for step, _ in self._committed())

    def save(self, step: int, arrays: Mapping[str, Any], *, object_graph: Any = None,
             user_metadata: dict | None = None) -> None:
        """Starts a local save of ``arrays`` as ``step`` (all processes, same step).

        Returns once this process's shards are in host memory; writing, the peer copy
        and the commit run on the collectives thread. The previous local save is
        waited for first, and its error raised here.
        """
        self.prepare(step, arrays, object_graph=object_graph, user_metadata=user_metadata)()

    def prepare(self, step: int, arrays: Mapping[str, Any], *, object_graph: Any = None,
                user_metadata: dict | None = None) -> Callable[[], None]:
        """`save` in two halves: plans and snapshots now; the returned call starts it.

        A manager saving both tiers in one call snapshots for the local tier before
        it starts the persistent save, so this planning never competes for the CPU
        with that save's background writes (57 ms of blocking on this VM otherwise).
        """
        self.sync()
        plan = snapshot(plan_save(arrays, is_coordinator=self._comm.is_coordinator))

        def start() -> None:
            self._pending = submit(
                lambda: self._save_step(int(step), plan, object_graph, user_metadata))

        return start

    def sync(self) -> None:
        """Waits for the local save in flight; raises its error if it failed."""
        future, self._pending = self._pending, None
        if future is not None:
            future.result()

    def _metadata(self, plan: SavePlan, object_graph, user_metadata, values) -> bytes:
        """The step's metadata file, per-process values (``ProcessValue``) recorded."""
        graph = record_process_values(
            object_graph, [{"process": i, "values": v} for i, v in enumerate(values)])
        return encode_metadata(CheckpointMetadata(
            arrays=plan.arrays, object_graph=graph, save_time=time.time(),
            writer={"process_count": self._comm.process_count,
                    "hostname": socket.gethostname(), "jax_version": jax.__version__,
                    "tier": "local"},
            user_metadata=user_metadata))

    def _save_step(self, step: int, plan: SavePlan, object_graph, user_metadata) -> None:
        """Steps 2-5 of the save protocol (all processes, on the collectives thread)."""
        phases = _Phases()
        comm, n, me = self._comm, self._comm.process_count, self._comm.process_index
        where = os.path.join(self.directory, f"{STEP_PREFIX}{step}")
        pieces = [(piece_key(w.path, w.index), np.ascontiguousarray(w.data))
                  for w in plan.writes]
        copies = [("own", pieces, None)]
        if n > 1:  # memory to memory first: the copy is then written with our own
            after = self.peer_of[me]
            sources = [p for p, peer in enumerate(self.peer_of) if peer == me]
            header = json.dumps([[key, data.nbytes] for key, data in pieces]).encode()
            tag = f"local save of step {step}"
            got = comm.exchange({after: [header]}, dict.fromkeys(sources, 1),
                                tag=tag + " (piece list)", timeout_secs=self._timeout)
            listed = [(q, key, int(size)) for q in sources
                      for key, size in json.loads(got[q][0].tobytes())]
            sizes = [size for _, _, size in listed]
            if [b.nbytes for b in self._peer_buffers] != sizes:
                self._peer_buffers = [np.empty(size, np.uint8) for size in sizes]
            into, at = {}, 0
            for q in sources:
                count = sum(1 for source, _, _ in listed if source == q)
                into[q], at = self._peer_buffers[at:at + count], at + count
            got = comm.exchange({after: [data for _, data in pieces]}, into,
                                tag=tag + " (pieces)", timeout_secs=self._timeout)
            received = [buffer for q in sources for buffer in got[q]]
            copies.append(("peer", list(zip([key for _, key, _ in listed], received,
                                            strict=True)), sources))
            phases.mark("exchange")
        error = None
        try:
            shutil.rmtree(where, ignore_errors=True)  # an older save of this step
            os.makedirs(where)
            write_copies(where, copies)
            phases.mark("write")
        except Exception as e:  # reported to every process in step 4
            error = f"process {me}: writing {where}: {type(e).__name__}: {e}"

        def commit(reports: list[dict]) -> dict:
            failures = [r["error"] for r in reports if r.get("error")]
            if failures:
                raise CheckpointError(f"Local save of step {step} failed: "
                                      + "; ".join(failures))
            values = [r["values"] for r in reports]
            self._metadata(plan, object_graph, user_metadata, values)  # refuses a mismatch
            return {"save": uuid.uuid4().hex[:12], "time": time.time(), "values": values}

        decided = agree(comm, {"step": step, "error": error, "values": plan.process_values},
                        commit, kind="local save", tag=f"local save outcome of step {step}",
                        timeout_secs=self._timeout)
        # Written once committed: it records every process's per-process values.
        write_atomic(os.path.join(where, METADATA), self._metadata(
            plan, object_graph, user_metadata, decided["values"]))
        write_atomic(os.path.join(where, COMMITTED), json.dumps(
            {"step": step, "process_count": n, "save": decided["save"],
             "time": decided["time"], "run": self.run}).encode())
        self._apply_retention()
        nbytes = sum(data.nbytes for _, data in pieces)
        phases.mark("commit")
        logger.info("local save of step %d: %d own bytes (+ a peer copy) in %s at %s",
                    step, nbytes, phases, where)

    def _committed(self) -> list[tuple[int, dict]]:
        found = []
        for name in os.listdir(self.directory):
            step = step_of(name)
            if step is None:
                continue
            try:
                marker = read_json(os.path.join(self.directory, name, COMMITTED))
            except (OSError, ValueError):
                continue
            if (isinstance(marker, dict) and marker.get("step") == step
                    and marker.get("run") == self.run):  # another run's: ignored
                found.append((step, marker))
        return found

    def _apply_retention(self) -> None:
        """Keeps the newest ``max_to_keep`` committed steps; removes older ones and the
        leftovers of interrupted saves older than the newest commit (this process)."""
        committed = sorted(step for step, _ in self._committed())
        keep = set(committed[-self.max_to_keep:])
        newest = committed[-1] if committed else None
        for name in os.listdir(self.directory):
            step = step_of(name)
            if step is None or step in keep:
                continue
            if step in committed or (newest is not None and step < newest):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- restoring ------------------------------------------------------------------

    def open(self, min_step: int | None = None, *, step: int | None = None
             ) -> LocalRestore | str:
        """Agrees on the newest complete local step (all processes; collective).

        Args:
          min_step: only steps at least this new (the newest persistent step).
          step: only this step.

        Returns:
          A `LocalRestore` of the chosen step, or the reason there is none (the same
          on every process).
        """
        self.sync()
        inventory = self._inventory(min_step if step is None else step)
        if step is not None:
            inventory = [s for s in inventory if s["step"] == step]
        tag = "local tier restore: choosing the step"
        decided = run_ordered(lambda: agree(
            self._comm, inventory, _choose_step, kind="local open", tag=tag,
            timeout_secs=self._timeout))
        if decided.get("step") is None:
            return decided["why"]
        mine = next((s for s in inventory if s["save"] == decided["save"]), None)
        meta_bytes = self._metadata_of(decided, mine)
        metadata = decode_metadata(meta_bytes, source=f"local step {decided['step']}")
        return LocalRestore(self, decided, metadata)

    def _inventory(self, min_step: int | None) -> list[dict]:
        """What this directory holds of each committed step >= min_step (step 1)."""
        held = []
        for step, marker in self._committed():
            if min_step is not None and step < min_step:
                continue
            where = os.path.join(self.directory, f"{STEP_PREFIX}{step}")
            pieces: dict[str, list] = {}
            try:
                meta = decode_metadata(read_bytes(os.path.join(where, METADATA)), source=where)
                for kind in KINDS:
                    index = os.path.join(where, f"{kind}.json")
                    if not os.path.exists(index):
                        continue
                    for entry in read_json(index)["pieces"]:
                        if (marker["save"], entry["key"], kind) not in self._bad:
                            pieces.setdefault(entry["key"], [kind, entry["nbytes"]])
            except (OSError, ValueError, KeyError, CheckpointError) as e:
                logger.warning("local tier: ignoring step %d in %s: %s", step, where, e)
                continue
            held.append({"step": step, "save": marker["save"], "time": marker["time"],
                         "arrays": {p: math.prod(m.shape) for p, m in meta.arrays.items()},
                         "pieces": pieces})
        return held

    def _metadata_of(self, decided: dict, mine: dict | None) -> bytes:
        """This step's metadata: local, else sent by a holder (a replaced host)."""
        source, lacking = decided["metadata_from"], decided["lacking"]
        me = self._comm.process_index
        data = None
        if mine is not None:
            data = read_bytes(os.path.join(self.directory, f"{STEP_PREFIX}{decided['step']}",
                                      METADATA))
        sends = {p: [data] for p in lacking} if me == source else {}
        receives = {source: 1} if me in lacking else {}
        got = run_ordered(lambda: self._comm.exchange(
            sends, receives, tag="local tier restore: metadata", timeout_secs=self._timeout))
        return data if me not in lacking else got[source][0].tobytes()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, f"{STEP_PREFIX}{step}")






def peer_map(domains: list[str]) -> list[int]:
    """Who keeps each process's peer copy: ``result[p]``, given each one's failure domain.

    Processes are ordered by domain (then index) and each sends to the process the
    largest domain's size further along that order: with equal domains, that is the
    same position in the next domain, so each process receives exactly one copy and
    losing one whole domain loses no piece. Where that lands in its own domain (one
    domain holds more than half the processes), the next process of another domain
    is taken instead; with a single domain, the next process (losing one process's
    directory still loses nothing).
    """
    n = len(domains)
    order = sorted(range(n), key=lambda p: (domains[p], p))
    shift = max(domains.count(d) for d in set(domains)) % n if n > 1 else 0
    result = []
    for p in range(n):
        at = order.index(p)
        candidates = [order[(at + shift + k) % n] for k in range(n)]
        other = [q for q in candidates if domains[q] != domains[p]]
        result.append(other[0] if other else order[(at + 1) % n])
    return result


def _volume(bounds) -> int:
    return math.prod(b - a for a, b in bounds)


def _choose_step(inventories: list[list[dict]]) -> dict:
    """(coordinator) The newest complete (step, save), with every piece's holders."""
    candidates: dict[tuple[int, str], dict] = {}
    for process, steps in enumerate(inventories):
        for s in steps:
            c = candidates.setdefault((s["step"], s["save"]), {
                "step": s["step"], "save": s["save"], "time": s["time"],
                "arrays": s["arrays"], "holders": {}, "processes": []})
            c["processes"].append(process)
            for key, (kind, nbytes) in s["pieces"].items():
                c["holders"].setdefault(key, []).append([process, kind, nbytes])
    reasons = []
    for c in sorted(candidates.values(), key=lambda c: (c["step"], c["time"]), reverse=True):
        covered: dict[str, int] = {}
        for key in c["holders"]:
            path, bounds = bounds_of(key)
            covered[path] = covered.get(path, 0) + _volume(bounds)
        short = sorted(p for p, numel in c["arrays"].items() if covered.get(p, 0) != numel)
        if short:
            reasons.append(f"step {c['step']} has no live copy of parts of {short[:3]}")
            continue
        lacking = [p for p in range(len(inventories)) if p not in c["processes"]]
        return {"step": c["step"], "save": c["save"], "holders": c["holders"],
                "metadata_from": min(c["processes"]), "lacking": lacking}
    if not candidates:
        reasons.append("no committed local step new enough in any process's directory")
    return {"step": None, "why": "; ".join(reasons)}


def _assign(requests: list[dict], holders: dict[str, list]) -> dict:
    """(coordinator) Who serves each needed piece: the requester if it holds a good
    copy, else the holder with the fewest bytes to send so far (own copies first)."""
    bad = {(p, key, kind) for p, r in enumerate(requests) for key, kind in r["bad"]}
    live = {key: [h for h in hs if (h[0], key, h[1]) not in bad] for key, hs in holders.items()}
    load = [0] * len(requests)
    plans = [{"local": [], "send": {}, "recv": {}} for _ in requests]
    for requester, r in enumerate(requests):
        for key in r["needs"]:
            copies = live.get(key) or []
            if not copies:  # a value, not an error: every process must raise the same
                return {"unusable": f"piece {key} has no copy with a good checksum left"}
            here = [h for h in copies if h[0] == requester]
            if here:
                plans[requester]["local"].append([key, here[0][1]])
                continue
            process, kind, nbytes = min(copies, key=lambda h: (load[h[0]], h[1] != "own"))
            load[process] += nbytes
            plans[process]["send"].setdefault(str(requester), []).append([key, kind])
            plans[requester]["recv"].setdefault(str(process), []).append(key)
    return {"plans": plans}


class LocalRestore:
    """One agreed local step, ready to be read onto any target (see module doc)."""

    def __init__(self, tier: LocalTier, decided: dict, metadata: CheckpointMetadata):
        self.tier, self.metadata = tier, metadata
        self.step, self.save = decided["step"], decided["save"]
        self._holders = decided["holders"]
        self._where = self.where = tier.step_path(self.step)
        self._index: dict[tuple[str, str], dict] | None = None

    def read(self, targets: Mapping[str, Any]) -> dict[str, Any]:
        """Reads ``targets`` ({path: target}, as `_engine.restore_arrays`) from this
        step (all processes, the same paths; collective).

        Raises:
          LocalStepUnusable: a needed piece has no good copy left (every process).
        """
        comm, timeout = self.tier._comm, self.tier._timeout
        phases = _Phases()
        plans = {path: plan_read(path, self.metadata.arrays[path], target)
                 for path, target in targets.items()}
        by_array: dict[str, list] = {}
        for key in self._holders:
            path, bounds = bounds_of(key)
            by_array.setdefault(path, []).append((key, bounds))
        needs = sorted({key for path, (_, reads) in plans.items() for read in reads
                        for key, _ in _overlapping(by_array.get(path, ()), read.index)})
        bad: list[list[str]] = []
        while True:
            decided = self._agree({"needs": needs, "bad": bad},
                                  lambda rs: _assign(rs, self._holders), "local read plan",
                                  "local tier restore: assigning pieces")
            if "unusable" in decided:
                raise LocalStepUnusable(
                    f"local step {self.step} cannot be restored: {decided['unusable']}")
            plan = decided["plans"][comm.process_index]
            served = {tuple(x) for x in plan["local"]} | {
                tuple(x) for xs in plan["send"].values() for x in xs}
            phases.mark("plan")
            data, failed = self._load(served)
            phases.mark("read+verify")
            any_bad = self._agree(failed, any, "local read check",
                                  "local tier restore: checksums")
            if not any_bad:
                break
            for key, kind in failed:
                logger.warning("local tier: %s copy of piece %s in %s fails its checksum; "
                               "using another copy", kind, key, self._where)
                self.tier._bad.add((self.save, key, kind))
            bad += failed
        sends = {int(p): [data[tuple(x)] for x in xs] for p, xs in plan["send"].items()}
        size = {key: holders[0][2] for key, holders in self._holders.items()}
        receives = {int(p): [size[key] for key in keys] for p, keys in plan["recv"].items()}
        got = run_ordered(lambda: comm.exchange(sends, receives, tag="local tier restore: pieces",
                                             timeout_secs=timeout))
        phases.mark("exchange")
        pieces = {key: data[(key, kind)] for key, kind in plan["local"]}
        for p, keys in plan["recv"].items():
            pieces.update(zip(keys, got[int(p)], strict=True))
        built = {path: finish_read(self.metadata.arrays[path], targets[path], sharding,
                                   self._build(path, sharding, reads, by_array, pieces))
                 for path, (sharding, reads) in plans.items()}
        phases.mark("build")
        logger.info("read local step %d: %d pieces here, %d sent, %d received in %s",
                    self.step, len(plan["local"]), sum(map(len, sends.values())),
                    sum(map(len, receives.values())), phases)
        return built

    def _agree(self, value, decide, kind: str, tag: str):
        tier = self.tier
        return run_ordered(lambda: agree(tier._comm, value, decide, kind=kind, tag=tag,
                                         timeout_secs=tier._timeout))

    def _load(self, served: set[tuple[str, str]]) -> tuple[dict, list]:
        """Reads and checks the pieces this process serves: ({(key, kind): bytes}, bad)."""
        if self._index is None:
            self._index = {}
            for kind in KINDS:
                path = os.path.join(self._where, f"{kind}.json")
                if os.path.exists(path):
                    for entry in read_json(path)["pieces"]:
                        self._index[(entry["key"], kind)] = entry

        def load(what):
            entry = self._index.get(what)
            try:
                if entry is None:
                    raise FileNotFoundError(what)
                buffer = map_piece(os.path.join(self._where, entry["file"]), entry["nbytes"])
                if buffer is None:
                    return what, None
                ok = verify(buffer, entry["checksum"], entry["value"])
                return what, buffer if ok else None
            except OSError:
                return what, None

        with cf.ThreadPoolExecutor(IO_THREADS) as pool:
            loaded = dict(pool.map(load, sorted(served)))
        failed = sorted([list(w) for w, b in loaded.items() if b is None])
        return {w: b for w, b in loaded.items() if b is not None}, failed

    def _build(self, path, sharding, reads, by_array, pieces):
        """The array of ``path`` on ``sharding`` (None: host numpy) from the pieces."""
        meta = self.metadata.arrays[path]
        if meta.nbytes == 0:
            value = np.zeros(meta.shape, meta.dtype)
            return value if sharding is None else jax.device_put(value, sharding)
        buffers = []
        for read in reads:
            shape = tuple(s.stop - s.start for s in read.index)
            overlapping = _overlapping(by_array.get(path, ()), read.index)
            whole = [key for key, bounds in overlapping
                     if bounds == tuple((s.start, s.stop) for s in read.index)]
            if whole:  # the saved shard is the target slice: its bytes, not a copy
                buffer = pieces[whole[0]].view(meta.dtype).reshape(shape)
                overlapping = []
            else:
                buffer = tsio.aligned_empty(shape, meta.dtype)
            for key, bounds in overlapping:
                piece = pieces[key].view(meta.dtype).reshape([b - a for a, b in bounds])
                lo = [max(a, s.start) for (a, _), s in zip(bounds, read.index, strict=True)]
                hi = [min(b, s.stop) for (_, b), s in zip(bounds, read.index, strict=True)]
                src = tuple(slice(low - a, high - a)
                            for low, high, (a, _) in zip(lo, hi, bounds, strict=True))
                dst = tuple(slice(low - s.start, high - s.start)
                            for low, high, s in zip(lo, hi, read.index, strict=True))
                buffer[dst] = piece[src]
            if sharding is None:
                return buffer
            kind = getattr(sharding, "memory_kind", None)
            buffers += jax.device_put(
                [buffer] * len(read.devices),
                [jax.sharding.SingleDeviceSharding(d, memory_kind=kind) for d in read.devices],
                may_alias=True)
        return jax.make_array_from_single_device_arrays(meta.shape, sharding, buffers)




def _overlapping(pieces, index) -> list:
    """The (key, bounds) of ``pieces`` that overlap the global slice ``index``."""
    return [(key, bounds) for key, bounds in pieces
            if all(a < s.stop and s.start < b for (a, b), s in zip(bounds, index, strict=True))]



