"""One benchmark process: build a workload in one system, run the asked phases, time them.

Started by ``scripts/bench.py`` (alone, or under ``python -m launch -n P``), never by
hand. Rank 0 appends one JSON object per phase to ``--out``.

Phases: ``save``; ``restore:<4x2|2x4|replicated>`` (page cache dropped first);
``async`` (how long the call blocks, then the full time); ``verify`` (page cache
dropped first) and ``delete`` of the checkpoint the save wrote, for systems that have
them. ``--memory`` resets the
peak-RSS counter before each phase and reports the peak above the resident set that
the process had once the data existed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

__all__ = ["main"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _barrier_fn(system: str, size: int):
    if size == 1:
        return lambda: None
    from mpi4py import MPI

    return MPI.COMM_WORLD.Barrier


def _timed(barrier, fn):
    barrier()
    start = time.perf_counter()
    out = fn()
    barrier()
    return time.perf_counter() - start, out


def run_phase(system, phase, path, barrier, rank, size, memory):
    """Runs one phase; returns its record (seconds, bytes, optional peak RSS)."""
    record = {"phase": phase}
    if phase.startswith(("restore", "verify")) and rank == 0:
        record["cache_dropped"] = drop_caches()
    gc.collect()
    if memory:
        base = _status_kib("VmRSS")
        _reset_peak()
    if phase in ("save", "async"):
        system.clear(path)  # deleting the previous checkpoint is not part of a save
    if phase == "save":
        record["seconds"], _ = _timed(barrier, lambda: system.save(path))
    elif phase.startswith("restore:"):
        layout = phase.split(":", 1)[1]
        record["seconds"], out = _timed(barrier, lambda: system.restore(path, layout))
        if size == 1 and not memory:
            system.check(out)
        if memory:
            record["peak_extra_bytes"] = (_status_kib("VmHWM") - base) * 1024
        del out
    elif phase in ("verify", "delete"):
        record["seconds"], _ = _timed(barrier, lambda: getattr(system, phase)(path))
    elif phase == "async":
        record["blocking_seconds"], wait = _timed(barrier, lambda: system.async_save(path))
        waited, _ = _timed(barrier, wait)
        record["seconds"] = record["blocking_seconds"] + waited
    if memory and "peak_extra_bytes" not in record:
        record["peak_extra_bytes"] = (_status_kib("VmHWM") - base) * 1024
    return record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True)
    p.add_argument("--workload", required=True,
                   choices=["large", "large4g", "small", "many", "tiny"])
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--arrays", type=int, required=True)
    p.add_argument("--phases", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--memory", action="store_true")
    args = p.parse_args()

    if args.system in ("dcheckpoint", "orbax"):
        import launch

        launch.initialize()
    from bench_systems import _mpi_rank_size, make_system, workload_shapes

    rank, size = _mpi_rank_size()
    barrier = _barrier_fn(args.system, size)
    system = make_system(args.system)
    shapes = workload_shapes(args.workload, args.bytes, args.arrays)
    system.make_state(shapes, args.workload)
    nbytes = sum(4 * int(__import__("math").prod(s)) for s in shapes)
    path = os.path.join(args.dir, f"{args.system}-{args.workload}-p{size}")
    records = []
    if args.warmup:
        # Untimed in the table; kept as "first_save" (Orbax compiles on its first save).
        first = run_phase(system, "save", path + "-warm", barrier, rank, size, False)
        first["phase"] = "first_save"
        first.update(system=args.system, workload=args.workload, processes=size)
        records.append(first)
    for phase in args.phases.split(","):
        target = path + "-async" if phase == "async" else path
        rec = run_phase(system, phase, target, barrier, rank, size, args.memory)
        rec.update(system=args.system, workload=args.workload, processes=size, bytes=nbytes,
                   arrays=len(shapes))
        records.append(rec)
    for rec in records:
        rec["bytes"] = nbytes
    if rank == 0:
        with open(args.out, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    if size == 1:
        # Orbax's background machinery can hold a finished process for ~40 s at exit;
        # everything is written and synced, so leave at once.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
