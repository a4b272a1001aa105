"""dcheckpoint vs Orbax on one accelerator: save, restore, async blocking, a checkpoint
from 8 CPU devices, host peak memory. Writes JSON; finishes in a few minutes.

    PYTHONPATH=<dir with dcheckpoint, mesh, launch> python3 scripts/bench_gpu.py --out r.json
    PYTHONPATH=$PWD .venv/bin/python scripts/bench_gpu.py --platform cpu --size-gib 0.25 \\
        --out /tmp/r.json                       # the same run on a CPU, to try it out

What each row measures (``--size-gib`` of float32 in ``--arrays`` equal 2-D arrays on
device 0; the systems alternate, best of ``--rounds``; the page cache is dropped before
every restore when we are root; a previous checkpoint is deleted outside the timing):

- ``save``: synchronous save from the device to local disk.
- ``restore``: restore onto the device (single-device sharding), checked equal.
- ``async_blocking``: how long an async save blocks, with freshly computed arrays (the
  output of a jitted ``x * 1.0``): an earlier ``np.asarray`` caches a host copy on a
  jax.Array, which would make a snapshot look free. ``async_total``: until committed.
- ``restore_from_cpu8``: restore onto the device of a checkpoint written by a
  subprocess with 8 emulated CPU devices on a (4, 2) mesh (many small shards).
- ``raw_read``: 16 threads reading dcheckpoint's files into memory, no decoding: the
  disk's limit for a restore.
- ``restore_host`` (dcheckpoint): the same checkpoint restored to host numpy arrays.
- ``restore_mesh42``: with ``--platform cpu --cpu-devices 8``, the one-device
  checkpoint restored onto a (4, 2) mesh (coarse to fine: each 256 MiB shard feeds 8
  devices).
- ``host_peak``: peak resident memory of a restore onto the device beyond what the
  process had before, in a fresh process per system (VmHWM; tracemalloc would miss
  C++ allocations). ``--variant ENV=VALUE`` (repeatable) adds a dcheckpoint row
  ``host_peak ENV=VALUE`` run with that environment (e.g. another read window).

Only jax, tensorstore, numpy (and orbax-checkpoint for the peer) are needed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time

from bench_worker import drop_caches  # scripts/ is this script's sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("dcheckpoint", "orbax")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _shapes(size_gib: float, arrays: int) -> list[tuple[int, int]]:
    side = int((size_gib * 2**30 / arrays / 4) ** 0.5) // 64 * 64
    return [(side, side)] * arrays


def _make_state(shapes, sharding, seed=0):
    """Random float32 arrays computed on the device (never seen by the host)."""
    import jax

    state = {}
    for i, shape in enumerate(shapes):
        make = jax.jit(lambda k, shape=shape: jax.random.uniform(k, shape),
                       out_shardings=sharding)
        state[f"a{i:02d}"] = make(jax.random.key(seed * 1000 + i))
    jax.block_until_ready(state)
    return state


def _targets(state_or_shapes, sharding):
    import jax
    import numpy as np

    items = (state_or_shapes.items() if isinstance(state_or_shapes, dict)
             else ((f"a{i:02d}", s) for i, s in enumerate(state_or_shapes)))
    return {k: jax.ShapeDtypeStruct(getattr(v, "shape", v), np.float32, sharding=sharding)
            for k, v in items}


class Dcheckpoint:
    def __init__(self):
        import dcheckpoint

        self.dc = dcheckpoint

    def save(self, path, state):
        self.dc.save_pytree(path, state)

    def restore(self, path, targets):
        return self.dc.restore_pytree(path, targets)

    def async_save(self, path, state):
        ckpt = self.dc.Checkpoint(state=state)
        ckpt.write(path, options=self.dc.CheckpointOptions(enable_async=True))
        return ckpt.sync


class Orbax:
    def __init__(self):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.sync = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        self.asyn = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())

    def save(self, path, state):
        self.sync.save(os.path.abspath(path), args=self.ocp.args.StandardSave(state))

    def restore(self, path, targets):
        return self.sync.restore(os.path.abspath(path),
                                 args=self.ocp.args.StandardRestore(targets))

    def async_save(self, path, state):
        self.asyn.save(os.path.abspath(path), args=self.ocp.args.StandardSave(state))
        return self.asyn.wait_until_finished


def _system(name):
    return {"dcheckpoint": Dcheckpoint, "orbax": Orbax}[name]()


def _setup_jax(platform: str, cpu_devices: int = 1):
    if platform == "cpu":
        import launch

        launch.emulate_cpu_devices(cpu_devices)
    import jax

    return jax


# --- children (fresh processes) ------------------------------------------------------

def child_write_cpu8(args) -> None:
    """Writes the workload from 8 CPU devices on a (4, 2) mesh."""
    jax = _setup_jax("cpu", 8)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    state = _make_state(_shapes(args.size_gib, args.arrays), NamedSharding(mesh, P("x", "y")),
                        seed=7)
    for name in args.systems.split(","):
        path = os.path.join(args.dir, f"cpu8-{name}")
        _remove(path)
        _system(name).save(path, state)
    print(json.dumps({"ok": True}))
    sys.stdout.flush()
    os._exit(0)  # Orbax's background threads can hold a finished process at exit


def child_memory(args) -> None:
    """One restore onto the device in a fresh process: peak RSS above the start."""
    jax = _setup_jax(args.platform)
    import numpy as np

    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    jax.device_put(np.zeros(8, np.float32), sharding).block_until_ready()  # start runtime
    system = _system(args.system)
    targets = _targets(_shapes(args.size_gib, args.arrays), sharding)
    cache_dropped = drop_caches()
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        base = _status("VmHWM")  # cannot reset: count growth above the earlier peak
    start = time.perf_counter()
    out = system.restore(args.path, targets)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_extra_bytes": _status("VmHWM") - base, "seconds": seconds,
                      "cache_dropped": cache_dropped}))
    sys.stdout.flush()
    os._exit(0)


def _run_child(args, *extra, platform=None, timeout=300, env_extra=None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--dir", args.dir,
           "--size-gib", str(args.size_gib), "--arrays", str(args.arrays),
           "--systems", args.systems, "--platform", platform or args.platform, *extra]
    env = dict(os.environ, **(env_extra or {}))
    if (platform or args.platform) == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {extra} failed (rc {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    return json.loads(lines[-1])


# --- the run -----------------------------------------------------------------------

def _raw_read(path: str) -> float:
    """Seconds for 16 threads to read every data file under ``path``."""
    import numpy as np

    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
             if not f.endswith(".json")]

    def read(p):
        buf = np.empty(os.path.getsize(p), np.uint8)
        with open(p, "rb", buffering=0) as f:
            f.readinto(memoryview(buf))
        return buf.nbytes

    drop_caches()
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        sum(pool.map(read, files))
    return time.perf_counter() - start


class Run:
    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.result = {"args": vars(args), "rows": {}, "notes": [], "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def record(self, row, system, seconds, **extra):
        entry = self.result["rows"].setdefault(row, {}).setdefault(system, {"seconds": []})
        entry["seconds"].append(round(seconds, 4))
        entry.update(extra)
        print(f"  {row:18s} {system:12s} {seconds:8.3f} s {extra or ''}", flush=True)
        self.save()

    def save(self):
        self.result["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.result["summary"] = summarize(self.result)
        with open(self.args.out, "w") as f:
            json.dump(self.result, f, indent=1)

    def phase(self, name, need_s) -> bool:
        if self.left() < need_s:
            print(f"skip {name}: {self.left():.0f} s left", flush=True)
            self.result["skipped"].append(name)
            self.save()
            return False
        print(f"{name} ({self.left():.0f} s left)", flush=True)
        return True


def main_run(args) -> None:
    jax = _setup_jax(args.platform, args.cpu_devices)
    device = jax.devices()[0]
    run = Run(args)
    run.result.update(device=f"{device.platform}: {device.device_kind}",
                      jax=jax.__version__, cpu_count=os.cpu_count(),
                      root=os.geteuid() == 0)
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = _shapes(args.size_gib, args.arrays)
    nbytes = sum(4 * a * b for a, b in shapes)
    run.result["bytes"] = nbytes
    names = [s for s in args.systems.split(",") if s]
    systems = {}
    for name in names:
        try:
            systems[name] = _system(name)
        except ImportError as e:
            run.result["notes"].append(f"{name} unavailable: {e}")
    try:
        import orbax.checkpoint as ocp

        run.result["orbax_version"] = getattr(ocp, "__version__", "?")
    except ImportError:
        pass
    os.makedirs(args.dir, exist_ok=True)
    state = _make_state(shapes, sharding)
    targets = _targets(state, sharding)

    def check(out, name):
        same = all(bool(jax.numpy.array_equal(out[k], v)) for k, v in state.items())
        if not same:
            raise AssertionError(f"{name}: restored values differ from the saved ones")

    def orders(r):
        order = list(systems)
        return order[r % len(order):] + order[:r % len(order)]

    def timed_restore(row, n, where, restore_targets):
        """One restore with the page cache dropped first; returns what it restored."""
        dropped = drop_caches()
        start = time.perf_counter()
        out = systems[n].restore(where, restore_targets)
        jax.block_until_ready(out)
        run.record(row, n, time.perf_counter() - start, cache_dropped=dropped)
        return out

    path = {n: os.path.join(args.dir, f"ckpt-{n}") for n in systems}
    if run.phase("warm-up save (untimed: first-save compile, fresh pages)", 30):
        for n, s in systems.items():
            _remove(path[n])
            s.save(path[n], state)
    if run.phase("save", 30):
        for r in range(args.rounds):
            for n in orders(r):
                _remove(path[n])
                start = time.perf_counter()
                systems[n].save(path[n], state)
                run.record("save", n, time.perf_counter() - start)
    if run.phase("restore", 30):
        for r in range(args.rounds):
            for n in orders(r):
                check(timed_restore("restore", n, path[n], targets), n)
        if "dcheckpoint" in systems:
            run.record("raw_read", "dcheckpoint", _raw_read(path["dcheckpoint"]))
            for _ in range(args.rounds):
                timed_restore("restore_host", "dcheckpoint", path["dcheckpoint"],
                              dict.fromkeys(state))
    if len(jax.devices()) >= 8 and run.phase("restore onto a (4, 2) mesh", 30):
        mesh = jax.make_mesh((4, 2), ("x", "y"), devices=jax.devices()[:8],
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        mesh_targets = _targets(state, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec("x", "y")))
        for r in range(args.rounds):
            for n in orders(r):
                timed_restore("restore_mesh42", n, path[n], mesh_targets)
    if run.phase("async", 40):
        fresh_fn = jax.jit(lambda t: jax.tree.map(lambda x: x * 1.0, t))
        for r in range(args.rounds + 1):  # the first round allocates pinned memory
            for n in orders(r):
                fresh = fresh_fn(state)
                jax.block_until_ready(fresh)
                apath = path[n] + "-async"
                _remove(apath)
                start = time.perf_counter()
                wait = systems[n].async_save(apath, fresh)
                blocking = time.perf_counter() - start
                del fresh
                wait()
                total = time.perf_counter() - start
                row = "async_blocking" if r else "async_first_blocking"
                run.record(row, n, blocking)
                if r:
                    run.record("async_total", n, total)
    if run.phase("host peak memory (fresh process each)", 60):
        for n in systems:
            try:
                rec = _run_child(args, "--child", "memory", "--system", n, "--path", path[n],
                                 timeout=max(30, int(run.left())))
                run.record("host_peak", n, rec["seconds"],
                           peak_extra_bytes=rec["peak_extra_bytes"])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                run.result["notes"].append(f"host_peak {n}: {e}")
                run.save()
        for variant in args.variant if "dcheckpoint" in systems else []:
            key, _, value = variant.partition("=")
            try:
                rec = _run_child(args, "--child", "memory", "--system", "dcheckpoint",
                                 "--path", path["dcheckpoint"], env_extra={key: value},
                                 timeout=max(30, int(run.left())))
                run.record(f"host_peak {variant}", "dcheckpoint", rec["seconds"],
                           peak_extra_bytes=rec["peak_extra_bytes"])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                run.result["notes"].append(f"host_peak {variant}: {e}")
                run.save()
    if run.phase("restore from 8 CPU devices (written by a subprocess)", 60):
        try:
            _run_child(args, "--child", "write-cpu8", platform="cpu",
                       timeout=max(30, int(run.left()) - 20))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            run.result["notes"].append(f"restore_from_cpu8: {e}")
        else:
            cpu8_targets = _targets(shapes, sharding)
            for r in range(args.rounds):
                for n in orders(r):
                    timed_restore("restore_from_cpu8", n, os.path.join(args.dir, f"cpu8-{n}"),
                                  cpu8_targets)
    run.save()
    print_table(run.result)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def summarize(result: dict) -> dict:
    """Best seconds, GB/s and the issue's target ratios."""
    nbytes = result.get("bytes", 0)
    rows = {}
    for row, by_system in result["rows"].items():
        rows[row] = {}
        for system, entry in by_system.items():
            best = min(entry["seconds"])
            cell = {"best_s": best, "runs": len(entry["seconds"]),
                    "spread": round(max(entry["seconds"]) / best - 1, 3) if best else 0}
            if row in ("save", "restore", "restore_from_cpu8", "raw_read", "async_total",
                       "restore_host", "restore_mesh42"):
                cell["gbps"] = round(nbytes / best / 1e9, 3) if best else None
            if "peak_extra_bytes" in entry:
                cell["peak_extra_bytes"] = entry["peak_extra_bytes"]
                cell["peak_x_bytes"] = round(entry["peak_extra_bytes"] / nbytes, 3)
            rows[row][system] = cell

    def best(row, system):
        return rows.get(row, {}).get(system, {}).get("best_s")

    ratios = {}
    dc_r, ob_r = best("restore", "dcheckpoint"), best("restore", "orbax")
    if dc_r and ob_r:
        ratios["restore_speed_dc_over_orbax"] = round(ob_r / dc_r, 3)
    for system in SYSTEMS:
        b, s = best("async_blocking", system), best("save", system)
        if b is not None and s:
            ratios[f"async_blocking_over_save_{system}"] = round(b / s, 4)
    if best("async_blocking", "dcheckpoint") is not None and best("async_blocking", "orbax"):
        ratios["async_blocking_dc_over_orbax"] = round(
            best("async_blocking", "dcheckpoint") / best("async_blocking", "orbax"), 3)
    peak = rows.get("host_peak", {}).get("dcheckpoint", {}).get("peak_x_bytes")
    if peak is not None:
        ratios["host_peak_over_bytes_dcheckpoint"] = peak
    raw = best("raw_read", "dcheckpoint")
    for row in ("restore", "restore_host", "restore_mesh42"):
        if raw and best(row, "dcheckpoint"):
            ratios[f"{row}_over_raw_read"] = round(raw / best(row, "dcheckpoint"), 3)
    return {"rows": rows, "ratios": ratios}


def print_table(result: dict) -> None:
    summary = result["summary"]
    print(f"\n{result.get('device')}, {result['bytes'] / 2**30:.2f} GiB in "
          f"{result['args']['arrays']} arrays, best of {result['args']['rounds']}")
    print(f"{'row':22s}{'dcheckpoint':>24s}{'orbax':>24s}")
    for row, cells in summary["rows"].items():
        out = []
        for system in SYSTEMS:
            c = cells.get(system)
            if not c:
                out.append("-")
            elif "peak_extra_bytes" in c:
                out.append(f"{c['peak_extra_bytes'] / 2**30:.2f} GiB ({c['peak_x_bytes']:.2f}x)")
            elif "gbps" in c:
                out.append(f"{c['best_s']:.3f} s {c['gbps']:.2f} GB/s")
            else:
                out.append(f"{c['best_s']:.3f} s")
        print(f"{row:22s}" + "".join(f"{x:>24s}" for x in out))
    for k, v in summary["ratios"].items():
        print(f"  {k}: {v}")
    for note in result["notes"]:
        print(f"  note: {note}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--platform", default="gpu", choices=["gpu", "cpu"])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--arrays", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--dir", default=os.path.join(os.getcwd(), "bench-gpu-scratch"),
                   help="scratch directory on the disk under test")
    p.add_argument("--budget-s", type=float, default=220,
                   help="skip phases that would not fit in this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="--platform cpu: emulated devices (8 adds the (4, 2) mesh row)")
    p.add_argument("--variant", action="append", default=[],
                   help="ENV=VALUE: one more dcheckpoint host-peak run with that variable")
    p.add_argument("--child", choices=["memory", "write-cpu8"], help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    # The memory child shares the GPU with this process: no process takes 75% up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.child == "memory":
        child_memory(args)
    elif args.child == "write-cpu8":
        child_write_cpu8(args)
    else:
        main_run(args)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
