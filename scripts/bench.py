"""Checkpoint speed: dcheckpoint vs Orbax vs PyTorch DCP vs the disk's raw limit.

    bash scripts/setup_bench.sh                       # once: .venv-bench with the peers
    .venv-bench/bin/python scripts/bench.py           # full run (~15 min on 2 cores)
    .venv-bench/bin/python scripts/bench.py --quick   # 64 MiB, a minute or two
    .venv-bench/bin/python scripts/bench.py --json bench-results/full.json

Every phase runs in a fresh worker process (``scripts/bench_worker.py``), so nothing
one system allocated or cached helps the next; the systems alternate within each round,
each worker saves once untimed first (fresh pages are slow on this machine), and each
phase is repeated ``--rounds`` times: the table shows the best, and the spread
(worst/best - 1). The page cache is dropped before every restore when we are root.
See docs/PERFORMANCE.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict

__all__ = ["main"]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ("raw", "dcheckpoint", "orbax", "dcp")
PEERS = ("orbax", "dcp")
LARGE_PHASES = "save,restore:4x2,restore:2x4,restore:replicated,async"
MANY_PHASES = "save,restore:4x2,verify,delete"  # ("restore:4x2": each on one device)


def _config(quick: bool) -> dict:
    mib = 1 << 20
    if quick:
        return {"large": (64 * mib, 16), "small": (10 * mib, 200), "many": (0, 1000),
                "tiny": (5000 * 256, 5000), "scaling": (1, 2, 4)}
    return {"large": (1024 * mib, 16), "large4g": (4096 * mib, 16), "small": (100 * mib, 2000),
            "many": (0, 10_000), "tiny": (50_000 * 256, 50_000), "scaling": (1, 2, 4)}


def _run_worker(system, workload, size, phases, args, *, processes=1, memory=False,
                timeout_s=600):
    cmd = [sys.executable, os.path.join(HERE, "bench_worker.py"), "--system", system,
           "--workload", workload, "--bytes", str(size[0]), "--arrays", str(size[1]),
           "--phases", phases, "--dir", args.dir, "--out", args.records]
    cmd += ["--memory"] if memory else ["--warmup"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
    if processes > 1:
        cmd = [sys.executable, "-m", "launch", "-n", str(processes), "--devices-per-process",
               str(8 // processes), "--timeout", "900", *cmd[1:]]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  ! {system} {workload} p{processes} {phases}: no result within "
              f"{timeout_s}s (killed)", flush=True)
        with open(args.records, "a") as f:
            f.write(json.dumps({"system": system, "workload": workload, "timeout_s": timeout_s,
                                "processes": processes, "phases": phases}) + "\n")
        return
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        print(f"  ! {system} {workload} p{processes} {phases} failed:\n{tail}", flush=True)
    else:
        print(f"  {system:12s} {workload} p{processes} {phases} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)


def run_all(args) -> None:
    """Rounds of every workload, the systems in a rotating order, then the memory runs."""
    cfg = _config(args.quick)
    systems = [s for s in SYSTEMS if s in args.systems]
    plan = [("large", LARGE_PHASES, 1), ("small", "save,restore:4x2,async", 1)]
    plan += [(w, MANY_PHASES, 1) for w in ("many", "tiny")]
    plan += [("large", "save,restore:4x2", p) for p in cfg["scaling"] if p > 1]
    if "large4g" in cfg:  # where big shards and the read window matter
        plan.append(("large4g", "save,restore:4x2", 1))
    plan = [step for step in plan if step[0] in args.workloads.split(",")]
    for workload, phases, procs in plan:
        print(f"{workload} x{procs} process(es): {phases}", flush=True)
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                ph = _system_phases(system, phases)
                if not ph:
                    continue
                if system == "orbax" and workload != "large" and not args.quick:
                    # Orbax needs minutes per save of 2,000 arrays on 2 cores: one capped
                    # try, reported as a timeout if it does not finish.
                    if r == 0:
                        _run_worker(system, workload, cfg[workload], ph, args,
                                    timeout_s=args.orbax_small_timeout)
                    continue
                _run_worker(system, workload, cfg[workload], ph, args, processes=procs)
    if "large" not in args.workloads.split(","):
        return
    print("peak memory (fresh process per phase)", flush=True)
    for system in systems:
        for phase in ("save", "restore:4x2"):
            _run_worker(system, "large", cfg["large"], phase, args, memory=True)


def _system_phases(system: str, phases: str) -> str:
    """The phases a system has: raw saves and reads; verify is dcheckpoint's alone."""
    if system == "raw":
        return _raw_phases(phases)
    return ",".join(p for p in phases.split(",") if p != "verify" or system == "dcheckpoint")


def _raw_phases(phases: str) -> str:
    kept = [p for p in phases.split(",") if p in ("save", "restore:4x2")]
    return ",".join(kept)


def summarize(records: list[dict]) -> dict:
    """{(workload, processes, phase, memory?): {system: {best, spread, gbps, ...}}}."""
    groups = defaultdict(list)
    for r in records:
        if "timeout_s" in r:
            continue
        groups[(r["workload"], r["processes"], r["phase"], "peak_extra_bytes" in r,
                r["system"])].append(r)
    out = defaultdict(dict)
    for (workload, procs, phase, memory, system), recs in groups.items():
        key = f"{workload}|p{procs}|{phase}" + ("|memory" if memory else "")
        if memory:
            peak = max(r["peak_extra_bytes"] for r in recs)
            out[key][system] = {"peak_extra_bytes": peak, "x_bytes": peak / recs[0]["bytes"]}
            continue
        secs = [r["seconds"] for r in recs]
        entry = {"best_s": min(secs), "spread": max(secs) / min(secs) - 1, "runs": len(secs),
                 "arrays": recs[0].get("arrays"),
                 "gbps": recs[0]["bytes"] / min(secs) / 1e9, "bytes": recs[0]["bytes"],
                 "cache_dropped": all(r.get("cache_dropped", True) for r in recs)}
        if phase == "async":
            entry["blocking_s"] = min(r["blocking_seconds"] for r in recs)
        out[key][system] = entry
    return dict(out)


# One DCP rank holds every shard: its "2x4"/"replicated" restores read the same bytes
# into another placement of a one-rank mesh, a layout change without resharding.
_DCP_NOTE = " (1 rank: layout change, no resharding)"


def _ratio(a, b):
    return f"{a / b:5.2f}x" if a and b else "   - "


def print_table(summary: dict, records: list[dict]) -> None:
    cols = ["raw", "dcheckpoint", "orbax", "dcp"]
    print("\nThroughput, GB/s (best of N; spread = worst/best - 1)")
    print(f"{'path':34s}" + "".join(f"{c:>17s}" for c in cols)
          + "  dc/orbax  dc/dcp  dc/raw")
    print("(raw: 16 threads writing+fsyncing / reading one file per array, no encoding; "
          "first_save: a worker's first, untimed-elsewhere save, Orbax's compile included; "
          "orbax: default zstd compression)")
    for key in sorted(k for k in summary if not k.endswith("memory")):
        row = summary[key]
        cells = []
        for c in cols:
            e = row.get(c)
            cells.append(f"{e['gbps']:8.2f} ±{e['spread'] * 100:3.0f}%  " if e else f"{'-':>17s}")
        g = {c: row[c]["gbps"] for c in row}
        print(f"{key:34s}" + "".join(f"{x:>17s}" for x in cells)
              + f"  {_ratio(g.get('dcheckpoint'), g.get('orbax')):>8s}"
              + f"  {_ratio(g.get('dcheckpoint'), g.get('dcp')):>6s}"
              + f"  {_ratio(g.get('dcheckpoint'), g.get('raw')):>6s}")
    print("\nCost per array, microseconds (best; many = 10,000 arrays of 1-16 KiB, "
          "tiny = 50,000 of 256 B, small = 2,000 of 1-256 KiB)")
    for key in sorted(k for k in summary if k.split("|")[0] in ("small", "many", "tiny")
                      and not k.endswith("memory")):
        cells = [f"{c} {e['best_s'] / e['arrays'] * 1e6:7.0f} us ({e['best_s']:.2f} s)"
                 for c, e in sorted(summary[key].items()) if e.get("arrays")]
        print(f"  {key:30s} " + "; ".join(cells))
    print("\nAsync save: seconds the call blocks / synchronous save seconds (lower is better)")
    for key in sorted(k for k in summary if k.endswith("|async")):
        sync = summary[key.replace("|async", "|save")]
        cells = []
        for c in ("dcheckpoint", "orbax", "dcp"):
            if c in summary[key] and c in sync:
                b, s = summary[key][c]["blocking_s"], sync[c]["best_s"]
                cells.append(f"{c} {b:.3f}s/{s:.3f}s = {b / s * 100:.0f}%")
        print(f"  {key:30s} " + "; ".join(cells))
    print("\nResharded restore / same-mesh restore (throughput ratio)")
    for w in sorted({k.split("|")[0] + "|" + k.split("|")[1] for k in summary}):
        same = summary.get(f"{w}|restore:4x2", {})
        for layout in ("2x4", "replicated"):
            other = summary.get(f"{w}|restore:{layout}")
            if other:
                cells = [f"{c}{_DCP_NOTE if (c, w.endswith('p1')) == ('dcp', True) else ''} "
                         f"{other[c]['gbps'] / same[c]['gbps']:.2f}" for c in other if c in same]
                print(f"  {w}|{layout:10s} " + "; ".join(cells))
    print("\nPeak extra resident memory (fresh process; x = multiple of the bytes saved)")
    for key in sorted(k for k in summary if k.endswith("memory")):
        cells = [f"{c} {e['peak_extra_bytes'] / 2**20:.0f} MiB ({e['x_bytes']:.2f}x)"
                 for c, e in summary[key].items()]
        print(f"  {key:34s} " + "; ".join(cells))
    dropped = all(e.get("cache_dropped", True) for row in summary.values() for e in row.values())
    for r in records:
        if "timeout_s" in r:
            print(f"\nno result: {r['system']} {r['workload']} p{r['processes']} "
                  f"({r['phases']}) did not finish within {r['timeout_s']} s")
    print("\npage cache dropped before every restore: "
          + ("yes" if dropped else "NO (not root): restores may read from the page cache"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 MiB / 10 MiB workloads")
    p.add_argument("--json", help="also write the summary and raw records here")
    p.add_argument("--rounds", type=int, default=3, help="repeats of every phase (>= 3)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default="large,large4g,small,many,tiny",
                   help="which workloads to run (many/tiny: 10,000 / 50,000 small arrays)")
    p.add_argument("--dir", default=os.path.join(ROOT, "bench-results", "scratch"),
                   help="scratch directory; keep it on the disk under test, not tmpfs")
    p.add_argument("--orbax-small-timeout", type=int, default=240,
                   help="seconds allowed for Orbax's one try at the small workload")
    p.add_argument("--from-records", help="only print the table of an earlier records file")
    args = p.parse_args()
    if args.from_records:
        records = [json.loads(line) for line in open(args.from_records)]
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        args.records = os.path.join(args.dir, "records.jsonl")
        started = time.perf_counter()
        run_all(args)
        records = [json.loads(line) for line in open(args.records)]
        print(f"total {time.perf_counter() - started:.0f}s")
    summary = summarize(records)
    print_table(summary, records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "records": records, "quick": args.quick}, f,
                      indent=1)
    if not args.from_records:
        shutil.copy(args.records, os.path.join(os.path.dirname(args.dir), "last-records.jsonl"))
        for name in os.listdir(args.dir):
            if name != "records.jsonl":
                shutil.rmtree(os.path.join(args.dir, name), ignore_errors=True)


if __name__ == "__main__":
    main()
