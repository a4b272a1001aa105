"""Scale harness for the save protocol (issue 22): what coordination costs at P processes.

Two modes:

``--simulate P [P ...]``: P processes simulated in this interpreter, one thread and one
`dcheckpoint._threadcomm.ThreadCommunicator` each, running the real protocol code
(`_engine.write_and_commit`: identity step, manifests, the coverage check or the
steady-state check, the commit with its metadata file). What is simulated: each
process's plan comes from the index math below (an FSDP-like state over P x D devices
that no single machine has) instead of `plan_save` over jax.Arrays, and the chunks of
the large arrays are not written (the engine's ``writer`` hook returns what the
process would have written); the coordinator's small replicated arrays are really
written, packed, and read back. Bytes are the real encoded payloads each collective
moved. Each P gets a first save (full manifests) and a steady save (same plan, new
values). Restore planning is timed for one process: reading the metadata file, then
cutting its own devices' slices into chunk pieces with the engine's own
`_chunk_pieces` (the slices a process needs come from the same index math, as
`plan_read` would get them from a sharding).

``--mpiexec N [N ...]``: real jobs (``python -m launch -n N --devices-per-process 1``,
scripts/scale_worker.py) that save twice and restore a many-array state, checked
bit-identical, and report each save's phases: the coordination steps apart from the
I/O.

    python scripts/scale.py --simulate 8 64 256 1024 4096 --arrays 1000 \
        --devices-per-process 8 --json scale.json
    python scripts/scale.py --mpiexec 1 2 4 8 16 --arrays 200 --json scale_mp.json

Exits non-zero if any save or restore was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcheckpoint import _engine  # noqa: E402
from dcheckpoint._metadata import METADATA_FILE, ArrayMetadata  # noqa: E402
from dcheckpoint._options import CheckpointOptions  # noqa: E402
from dcheckpoint._plan import SavePlan, WriteItem  # noqa: E402
from dcheckpoint._threadcomm import ThreadJob  # noqa: E402

__all__ = ["main", "simulate", "SimulatedState"]

ROW_KEYS = ("processes", "arrays", "devices_per_process", "save", "gathered_bytes",
            "broadcast_bytes", "coordinator_cpu_s", "metadata_bytes", "restore_plan_s")


class SimulatedState:
    """An FSDP-like state of ``arrays`` arrays over P processes x D devices (N = P*D).

    Array kinds, by ``i % 10``: 0-5 weights sharded on dim 0 over all N devices (rows
    [256d, 256d+256) on device d, process d // D); 6-7 weights on an (N/2, 2) mesh
    ("data", "model"); 8 small vectors, replicated (written by process 0, packed);
    9 weights whose devices are in a ring order (device position j on process j % P:
    strided chunks). The last array's chunks go to processes in a shuffled order (the
    irregular case: listed chunk by chunk). Big chunks are 1 MiB, so not packed.
    """

    def __init__(self, processes: int, devices: int, arrays: int):
        self.p, self.d, self.n = processes, devices, processes * devices
        self.kinds = [("irregular" if i == arrays - 1 and arrays >= 10 else
                       ("rows", "rows", "rows", "rows", "rows", "rows", "block", "block",
                        "small", "ring")[i % 10]) for i in range(arrays)]
        self.paths = [f"layers/{i // 10:04d}/{k}{i % 10}" for i, k in enumerate(self.kinds)]
        self.table = {path: self._meta(path, kind)
                      for path, kind in zip(self.paths, self.kinds, strict=True)}
        owners = list(range(self.n))
        random.Random(0).shuffle(owners)  # chunk c of the irregular array: device owners[c]
        self.irregular: dict[int, list] = {q: [] for q in range(processes)}
        for chunk, device in enumerate(owners):
            self.irregular[device // devices].append((chunk, 0))

    def _meta(self, path: str, kind: str) -> ArrayMetadata:
        n, f32 = self.n, np.dtype("float32")
        if kind == "small":
            return ArrayMetadata(path, (1024,), f32, (1024,))
        if kind == "block":
            return ArrayMetadata(path, (n // 2 * 128, 2048), f32, (128, 1024),
                                 layout=_layout(["data", "model"], [n // 2, 2]))
        return ArrayMetadata(path, (n * 256, 1024), f32, (256, 1024),
                             layout=_layout(["fsdp"], [n]))

    def devices_of(self, p: int) -> range:
        return range(p * self.d, (p + 1) * self.d)

    def chunks(self, p: int) -> dict[str, list[tuple[int, ...]]]:
        """{path: chunk coordinates} process ``p`` writes (its devices' replica 0)."""
        mine = self.devices_of(p)
        by_kind = {
            "rows": [(dev, 0) for dev in mine],
            "block": [(dev // 2, dev % 2) for dev in mine],  # mesh (N/2, 2), row-major
            "ring": [(j, 0) for j in range(p, self.n, self.p)],
            "irregular": self.irregular[p],
            "small": [(0,)] if p == 0 else [],
        }
        return {path: by_kind[kind] for path, kind in zip(self.paths, self.kinds, strict=True)
                if by_kind[kind]}

    def slices(self, p: int) -> dict[str, list[tuple[slice, ...]]]:
        """{path: the slices process ``p``'s devices hold} (restoring onto the saved
        mesh; a replicated array whole on every process)."""
        out = {}
        chunks = self.chunks(p)
        for path, kind in zip(self.paths, self.kinds, strict=True):
            meta = self.table[path]
            if kind == "small":
                out[path] = [(slice(0, meta.shape[0]),)]
            else:
                out[path] = [tuple(slice(c * s, (c + 1) * s)
                                   for c, s in zip(chunk, meta.chunk_shape, strict=True))
                             for chunk in chunks[path]]
        return out

    def small_values(self, seed: float) -> dict[str, np.ndarray]:
        kinds = zip(self.paths, self.kinds, strict=True)
        return {path: np.full(1024, seed + i, np.float32)
                for i, (path, kind) in enumerate(kinds) if kind == "small"}

    def plan(self, p: int, seed: float) -> SavePlan:
        """Process ``p``'s save plan: the table, and real writes of its small arrays."""
        writes = () if p else tuple(
            WriteItem(path, (slice(0, 1024),), (0,), value)
            for path, value in self.small_values(seed).items())
        return SavePlan(arrays=self.table, writes=writes)


def _layout(names: list[str], shape: list[int]) -> dict:
    """The saved layout JSON (`mesh.Layout.to_json`) of a 2-d array on this mesh."""
    specs = list(names) if len(names) == 2 else [names[0], None]
    return {"sharding_specs": specs, "mesh": {"axis_names": names, "shape": shape}}


def _simulated_writer(state: SimulatedState, p: int):
    """Step 2 of process ``p``: really writes its small arrays (the engine's own
    `_write_chunks`, packed or not), reports the big ones' chunks without writing."""
    def write(staged, plan, compression, packer):
        return {**state.chunks(p), **_engine._write_chunks(staged, plan, compression, packer)}
    return write


def _save(job: ThreadJob, state: SimulatedState, directory: str, seed: float) -> dict:
    job.reset_counters()
    options = CheckpointOptions(timeout_secs=1200)
    started = time.perf_counter()
    results = job.run(lambda comm: _engine.write_and_commit(
        directory, state.plan(comm.process_index, seed), comm=comm, options=options,
        writer=_simulated_writer(state, comm.process_index)))
    wall = time.perf_counter() - started
    bad = [r for r in results if r != directory]
    if bad:
        raise RuntimeError(f"simulated save failed: {bad[0]!r}")
    phases = dict(_engine.LAST_SAVE_PHASES[0])
    process_cpu = [_engine.LAST_SAVE_PHASES[i].get("write_s", 0.0)
                   for i in range(job.process_count)]
    return {"phases": phases, "gathered": job.gathered_bytes,
            "broadcast": job.broadcast_bytes // max(1, job.process_count - 1),
            "coordinator_cpu": job.decide_cpu_s - phases.get("commit_cpu_s", 0.0),
            "wall": wall, "process_write_s": max(process_cpu)}


def _check_restore(state: SimulatedState, directory: str, seed: float) -> float:
    """Times one process's restore planning; checks it and the saved values."""
    p = state.p // 2
    wanted = state.slices(p)  # what the target sharding says (plan_read's input)
    started = time.perf_counter()
    metadata = _engine.read_metadata(directory)
    pieces = 0
    for path, meta in metadata.arrays.items():
        for index in wanted[path]:
            parts = _engine._chunk_pieces(index, meta.chunk_shape)
            covered = sum(int(np.prod([s.stop - s.start for s in piece])) for piece, _ in parts)
            if covered != int(np.prod([s.stop - s.start for s in index])):
                raise RuntimeError(f"restore plan of {path!r} does not cover {index}")
            pieces += len(parts)
    seconds = time.perf_counter() - started
    if set(metadata.arrays) != set(state.table) or any(
            (m.shape, m.chunk_shape, m.dtype) != (state.table[k].shape, state.table[k].chunk_shape,
                                                  state.table[k].dtype)
            for k, m in metadata.arrays.items()):
        raise RuntimeError("the metadata's array table is not the saved one")
    small = state.small_values(seed)
    restored = _engine.restore_arrays(directory, {k: None for k in small}, metadata=metadata)
    if any(not np.array_equal(restored[k], v) for k, v in small.items()):
        raise RuntimeError("restored small arrays differ from the saved ones")
    return seconds


def simulate(processes: int, arrays: int, devices: int, workdir: str) -> list[dict]:
    """A first and a steady save of P simulated processes; one row each."""
    state = SimulatedState(processes, devices, arrays)
    job = ThreadJob(processes)
    rows = []
    for kind, seed in (("first", 1.0), ("steady", 2.0)):
        directory = os.path.join(workdir, f"p{processes}-a{arrays}-{kind}")
        saved = _save(job, state, directory, seed)
        if saved["phases"]["steady"] != (kind == "steady") or saved["phases"]["resent"]:
            raise RuntimeError(f"{kind} save took the wrong path: {saved['phases']}")
        restore_s = _check_restore(state, directory, seed)
        rows.append({
            "processes": processes, "arrays": arrays, "devices_per_process": devices,
            "save": kind, "gathered_bytes": saved["gathered"],
            "broadcast_bytes": saved["broadcast"],
            "coordinator_cpu_s": round(saved["coordinator_cpu"], 4),
            "metadata_bytes": os.path.getsize(os.path.join(directory, METADATA_FILE)),
            "restore_plan_s": round(restore_s, 4),
            "gathered_bytes_per_process": saved["gathered"] // max(1, processes - 1),
            "chunks": sum(len(v) for p in range(processes) for v in state.chunks(p).values())
            if processes <= 64 else None,
            "check_s": round(saved["phases"].get("check_s", 0.0), 4),
            "commit_s": round(saved["phases"].get("commit_s", 0.0), 4),
            "wall_s": round(saved["wall"], 2),
        })
        print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    return (f"P={row['processes']:>5} A={row['arrays']:>5} D={row['devices_per_process']} "
            f"{row['save']:>6}: gathered {row['gathered_bytes']:>11,} B "
            f"({row['gathered_bytes_per_process']:,} B/process), broadcast "
            f"{row['broadcast_bytes']:,} B/process, coordinator CPU "
            f"{row['coordinator_cpu_s']:.3f} s, metadata {row['metadata_bytes']:,} B, "
            f"restore plan {row['restore_plan_s']:.3f} s")


def run_mpiexec(counts: list[int], arrays: int, workdir: str) -> list[dict]:
    """Real jobs of N processes x 1 CPU device (scripts/scale_worker.py); one row per
    job and save, from every rank's phases (see `phase_split`)."""
    rows = []
    worker = os.path.join(ROOT, "scripts", "scale_worker.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for n in counts:
        directory = os.path.join(workdir, f"mp{n}")
        command = [sys.executable, "-m", "launch", "-n", str(n), "--devices-per-process", "1",
                   "--timeout", "600", worker, "save", directory, str(arrays)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=660)
        ranks = worker_results(done.stdout)
        if done.returncode != 0 or len(ranks) != n:
            raise RuntimeError(f"{n} processes: exit {done.returncode}\n{done.stdout[-3000:]}"
                               f"\n{done.stderr[-3000:]}")
        if any(r["bad"] for r in ranks):
            raise RuntimeError(f"{n} processes: restored arrays differ: {ranks[0]['bad'][:5]}")
        for i, kind in enumerate(("first", "steady")):
            split = phase_split([r["saves"][i] for r in ranks])
            if split["steady"] != (kind == "steady"):
                raise RuntimeError(f"{n} processes: the {kind} save took the wrong path")
            rows.append({"processes": n, "arrays": arrays, "devices_per_process": 1,
                         "save": kind, **split,
                         "restore_s": round(max(r["restore_s"] for r in ranks), 4)})
            row = rows[-1]
            print(f"N={n:>3} {kind:>6}: total {row['total_s']:.3f} s, coordination "
                  f"{row['coordination_s']:.3f} s ({row['coordination_share']:.0%}), writes "
                  f"{row['write_s']:.3f} s, commit {row['commit_s']:.3f} s, other "
                  f"{row['other_s']:.3f} s, restore "
                  f"{row['restore_s']:.3f} s", flush=True)
    return rows


def worker_results(stdout: str) -> list[dict]:
    """The ``RESULT {json}`` objects of every rank, by rank (mpiexec may glue lines)."""
    decoder, found, start = json.JSONDecoder(), [], stdout.find("RESULT ")
    while start != -1:
        value, end = decoder.raw_decode(stdout, start + len("RESULT "))
        found.append(value)
        start = stdout.find("RESULT ", end)
    return sorted(found, key=lambda r: r["rank"])


def phase_split(saves: list[dict]) -> dict:
    """One save's time, split: coordination vs the I/O (every rank's phases).

    total: the slowest rank's save call. writes: the slowest rank's chunk writes.
    commit: the coordinator's commit (zarr.json nodes, metadata file, fsyncs, rename).
    coordination: what is left, the identity step (mean over ranks: a rank's wait there
    is for the others to arrive) plus the shortest manifests-and-outcome step (the rank
    that finished writing last waits for nothing but the coordinator's check, its
    commit and the messages), less the commit.
    """
    coordinator = saves[0]
    commit = coordinator.get("commit_s", 0.0)
    coordination = (sum(s["agree_s"] for s in saves) / len(saves)
                    + min(s["outcome_s"] for s in saves) - commit)
    total = max(s["total_s"] for s in saves)
    return {"total_s": round(total, 4), "write_s": round(max(s["write_s"] for s in saves), 4),
            "commit_s": round(commit, 4), "check_s": round(coordinator.get("check_s", 0.0), 4),
            "coordination_s": round(max(0.0, coordination), 4),
            "coordination_share": round(max(0.0, coordination) / total, 4) if total else 0.0,
            # planning, the snapshot, the object graph, and ranks arriving at different
            # times: the rest of the slowest call
            "other_s": round(max(0.0, total - coordination - commit
                                 - max(s["write_s"] for s in saves)), 4),
            "steady": all(s["steady"] for s in saves)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--simulate", type=int, nargs="+", metavar="P")
    mode.add_argument("--mpiexec", type=int, nargs="+", metavar="N")
    parser.add_argument("--arrays", type=int, nargs="+", default=[1000], metavar="A")
    parser.add_argument("--devices-per-process", type=int, default=8, metavar="D")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        try:
            if args.simulate:
                rows = [row for a in args.arrays for p in args.simulate
                        for row in simulate(p, a, args.devices_per_process, workdir)]
            else:
                rows = [row for a in args.arrays for row in run_mpiexec(args.mpiexec, a, workdir)]
        except RuntimeError as e:
            print(f"scale.py: wrong result: {e}", file=sys.stderr)
            return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
