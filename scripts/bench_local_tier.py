"""The local tier against the persistent tier: blocking time, save throughput, recovery.

    .venv/bin/python scripts/bench_local_tier.py                  # 1 GiB over 4 processes
    .venv/bin/python scripts/bench_local_tier.py --gib 2 --json out.json

A 4-process job (``python -m launch``, one CPU device each) trains a state of
``--gib`` GiB in 8 float32 arrays sharded over every process, with a local tier on
tmpfs (``/dev/shm``) every 2 steps and async persistent saves to the disk
(``--dir``) every 3 steps, steps 1..10: each save is timed as the caller's blocking
time and, after a ``sync()``, its total time. A second job, started fresh as a
restarted job is, restores the newest step from the local tier (step 10) and the newest
persistent step (9), twice each, alternating; before each persistent restore every
file of it is evicted from the page cache (``posix_fadvise(DONTNEED)`` after the
save's fsync: ``/proc/sys/vm/drop_caches`` is not writable in this VM's container, so
this is how the reads are made cold without it). A third job restores after host 1's
local directory is wiped (a replaced host): its rank reads nothing locally and fetches
every piece from the peer copy on host 2. Before the jobs, the raw limits:
1 GiB written to and read back from tmpfs and the disk (cold) with plain file calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROCESSES = 4
ARRAYS = 8
COLUMNS = 4096


def evict(directory: str) -> None:
    """Drops every file under ``directory`` from the page cache (they are fsynced)."""
    for folder, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def raw_limits(disk_dir: str, shm_dir: str, nbytes: int = 1 << 30) -> dict:
    """GB/s of plain writes (+ fsync) and reads of one file, on tmpfs and on disk."""
    import numpy as np

    data = np.ones(nbytes, np.uint8)
    back = np.ones(nbytes, np.uint8)  # touched: fresh pages are slow here (DESIGN.md)
    found = {}
    for label, folder in (("tmpfs", shm_dir), ("disk", disk_dir)):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "raw.bin")
        best = {"write": 0.0, "read": 0.0}
        for _ in range(2):
            started = time.perf_counter()
            with open(path, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            best["write"] = max(best["write"], nbytes / (time.perf_counter() - started) / 1e9)
            evict(folder) if label == "disk" else None
            started = time.perf_counter()
            with open(path, "rb") as f:
                f.readinto(memoryview(back))
            best["read"] = max(best["read"], nbytes / (time.perf_counter() - started) / 1e9)
        os.remove(path)
        found[label] = best
    return found


def _launch(mode: str, args, extra=()) -> list[dict]:
    cmd = [sys.executable, "-m", "launch", "-n", str(PROCESSES), "--devices-per-process",
           "1", "--timeout", "900", os.path.abspath(__file__), "--worker", mode,
           "--dir", args.dir, "--shm", args.shm, "--gib", str(args.gib), *extra,
           *(["--log"] if args.log else [])]
    env = dict(os.environ, PYTHONPATH=ROOT)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{mode} job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = []
    decoder = json.JSONDecoder()
    at = proc.stdout.find("RESULT ")
    while at != -1:
        value, end = decoder.raw_decode(proc.stdout, at + 7)
        rows.append(value)
        at = proc.stdout.find("RESULT ", end)
    if args.log:
        print("\n".join(line for line in proc.stderr.splitlines()
                        if "local" in line or "restored" in line))
    return [dict(r, job_wall_s=wall) for r in rows]


# -- the job's side ------------------------------------------------------------------

def _state(step, mesh, rows):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P("x"))
    make = jax.jit(lambda s: [jax.numpy.full((rows, COLUMNS), s + i, np.float32)
                              for i in range(ARRAYS)], out_shardings=[sharding] * ARRAYS)
    return {f"layer{i}": x for i, x in enumerate(make(np.float32(step)))}


def _manager(args, host):
    import dcheckpoint

    return dcheckpoint.PytreeManager(
        os.path.join(args.dir, "persistent"), max_to_keep=2, save_interval_steps=3,
        local_directory=os.path.join(args.shm, f"host{host}"), local_every=2,
        local_max_to_keep=2, options=dcheckpoint.CheckpointOptions(enable_async=True))


def worker(args) -> None:
    import launch

    info = launch.initialize()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rank = info.process_index
    if args.log:
        import logging

        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(name)s: %(message)s")
    mesh = jax.make_mesh((PROCESSES,), ("x",))
    rows = int(args.gib * (1 << 30)) // (ARRAYS * COLUMNS * 4) // PROCESSES * PROCESSES
    nbytes = rows * COLUMNS * 4 * ARRAYS
    if args.worker == "save":
        m = _manager(args, rank)
        saves = []
        for step in range(1, 11):
            state = _state(step, mesh, rows)
            jax.block_until_ready(state)
            multihost_utils.sync_global_devices(f"step {step}")
            started = time.perf_counter()
            m.save(step, state)
            blocked = time.perf_counter() - started
            m.sync()
            total = time.perf_counter() - started
            tiers = [t for t, every in (("local", 2), ("persistent", 3)) if step % every == 0]
            saves.append({"step": step, "tiers": tiers, "blocked_s": blocked, "total_s": total})
        m.close()
        print("RESULT " + json.dumps({"rank": rank, "bytes": nbytes, "saves": saves}),
              flush=True)
        return
    m = _manager(args, rank)
    target = jax.eval_shape(lambda: _state(0, mesh, rows))
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P("x")))
              for k, v in target.items()}
    restores = []
    rounds = (("local", None), ("persistent", 9))
    if args.worker == "restore-replaced":
        rounds = (("local (host 1 replaced)", None),)
    for _ in range(2):
        for tier, step in rounds:
            if tier == "persistent":
                evict(os.path.join(args.dir, "persistent", "ckpt-9"))
            multihost_utils.sync_global_devices(f"restore {tier}")
            started = time.perf_counter()
            value = m.restore(step, target=target)
            jax.block_until_ready(value)
            seconds = time.perf_counter() - started
            first = np.asarray(value["layer0"].addressable_shards[0].data)[0, 0]
            restores.append({"tier": tier, "from": m.restored_from, "seconds": seconds,
                             "value": float(first)})
            del value
    m.close()
    print("RESULT " + json.dumps({"rank": rank, "bytes": nbytes, "restores": restores}),
          flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=os.path.join(ROOT, "bench-results", "local-tier"))
    parser.add_argument("--shm", default="/dev/shm/dcheckpoint-bench-local")
    parser.add_argument("--json")
    parser.add_argument("--log", action="store_true", help="the jobs log each phase")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--worker", choices=["save", "restore", "restore-replaced"])
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    for folder in (args.dir, args.shm):
        shutil.rmtree(folder, ignore_errors=True)
    limits = raw_limits(os.path.join(args.dir, "raw"), os.path.join(args.shm, "raw"))
    saved = _launch("save", args)
    restored = _launch("restore", args)
    shutil.rmtree(os.path.join(args.shm, "host1"))
    replaced = _launch("restore-replaced", args)
    report = {"gib": args.gib, "processes": PROCESSES, "raw_limits_GBps": limits,
              "save": saved, "restore": restored, "restore_replaced": replaced}
    nbytes = saved[0]["bytes"]
    print(f"state: {nbytes / 2**30:.2f} GiB in {ARRAYS} arrays over {PROCESSES} processes")
    print(f"raw limits (1 GiB, one file): tmpfs write {limits['tmpfs']['write']:.2f} / read "
          f"{limits['tmpfs']['read']:.2f} GB/s; disk write+fsync {limits['disk']['write']:.2f}"
          f" / cold read {limits['disk']['read']:.2f} GB/s")
    print("step  tiers               blocked (max over processes)   total")
    for i, row in enumerate(saved[0]["saves"]):
        blocked = max(r["saves"][i]["blocked_s"] for r in saved)
        total = max(r["saves"][i]["total_s"] for r in saved)
        print(f"{row['step']:>4}  {'+'.join(row['tiers']) or '-':<18}  {blocked:8.4f} s"
              f"{'':>20}{total:8.3f} s")
    local = [i for i, row in enumerate(saved[0]["saves"]) if row["tiers"] == ["local"]][1:]
    if local:
        best = min(max(r["saves"][i]["total_s"] for r in saved) for i in local)
        # Each process writes its own shards and a peer's: twice the state, job-wide.
        print(f"local save throughput: {2 * nbytes / best / 1e9:.2f} GB/s written job-wide "
              f"({nbytes / best / 1e9:.2f} GB/s of state), best of steps "
              f"{[saved[0]['saves'][i]['step'] for i in local]}")
    for j, row in enumerate(restored[0]["restores"]):
        seconds = max(r["restores"][j]["seconds"] for r in restored)
        print(f"restore {row['tier']:<10} ({row['from']}): {seconds:.3f} s "
              f"({nbytes / seconds / 1e9:.2f} GB/s)")
    for j, row in enumerate(replaced[0]["restores"]):
        seconds = max(r["restores"][j]["seconds"] for r in replaced)
        print(f"restore {row['tier']} ({row['from']}): {seconds:.3f} s "
              f"({nbytes / seconds / 1e9:.2f} GB/s)")
    best = {tier: min(max(r["restores"][j]["seconds"] for r in restored)
                      for j, row in enumerate(restored[0]["restores"]) if row["tier"] == tier)
            for tier in ("local", "persistent")}
    print(f"recovery: local {best['local']:.3f} s vs persistent {best['persistent']:.3f} s: "
          f"{best['persistent'] / best['local']:.1f}x; restore job wall "
          f"{restored[0]['job_wall_s']:.1f} s")
    report["best_restore_s"] = best
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if not args.keep:
        shutil.rmtree(args.shm, ignore_errors=True)


if __name__ == "__main__":
    main()
