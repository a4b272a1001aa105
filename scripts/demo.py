"""The demo: preempt a 2-host training job (SIGKILL, then SIGTERM), resume it on another
mesh, compare.

1. Start ``scripts/train.py`` as 2 processes x 4 CPU devices on a (4, 2) mesh.
2. Once a checkpoint at or past ``--preempt-after`` is committed, SIGKILL every rank
   (a hard kill: no handler runs, an async save may be half written).
3. Resume the same directory with 1 process x 8 devices on a (2, 4) mesh, to the end.
4. Start the job again in a fresh directory with ``--save-on-preemption`` and, past step
   ``--preempt-after``, send SIGTERM (a preemption notice) to rank 1 only: both ranks
   agree on one step, save there, and exit 0. Resume that on 1 x 8 devices too.
5. The local tier: train again with local saves (tmpfs when there is one) every 2
   steps beside the persistent ones every ``--save-every``; once a local step newer
   than every persistent checkpoint is committed, SIGKILL every rank, wipe rank 1's
   local directory (a replaced host) and resume with the ranks renumbered (rank 0
   gets the wiped host's directory) on a (2, 4) mesh: from the local tier, at a
   newer step than the persistent tier holds.
6. Run the same job uninterrupted (2 x 4 devices, (4, 2) mesh) in a fresh directory.
7. Compare every resumed run's final parameters and loss with it bit for bit, and
   print a short summary.

Usage: ``.venv/bin/python scripts/demo.py [--steps 60 --save-every 10 ...]``.
Exit status 0 when the resumed run matches the uninterrupted one exactly, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["main", "run_scenario"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN = REPO_ROOT / "scripts" / "train.py"
_PIDS = re.compile(r"\[train\] pids ([\d ]+)")
_COMMITTED = re.compile(r"\[train\] committed ckpt-(\d+)")
_STEP = re.compile(r"\[train\] step (\d+) ")
_PREEMPTED = re.compile(r"\[train\] preempted: saved at step (\d+)")
_LOCAL = re.compile(r"\[train\] local step (\d+) committed")
RESULT_MARKER = "RESULT "


class Job:
    """One ``python -m launch`` run of train.py, its output echoed with a prefix."""

    def __init__(self, name: str, processes: int, devices: int, train_args: list[str]):
        command = [
            sys.executable, "-m", "launch", "-n", str(processes),
            "--devices-per-process", str(devices), "--timeout", "300",
            str(TRAIN), *train_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.name, self.pids, self.result, self.other_lines = name, [], None, 0
        self.last_step, self.committed, self.preemption_step = 0, [], None
        self.local_committed: list[int] = []
        self._on_line = None
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)

    def start(self, on_line=None) -> Job:
        self._on_line = on_line
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT_MARKER):
                self.result = json.loads(line[len(RESULT_MARKER):])
                continue
            if match := _PIDS.search(line):
                self.pids = [int(pid) for pid in match[1].split()]
                continue
            if not line.startswith("[train]"):
                self.other_lines += 1  # MPI, gloo and JAX chatter (teardown after a kill)
                continue
            if match := _STEP.search(line):
                self.last_step = int(match[1])
            if match := _COMMITTED.search(line):
                self.committed.append(int(match[1]))
            if match := _PREEMPTED.search(line):
                self.preemption_step = int(match[1])
            if match := _LOCAL.search(line):
                self.local_committed.append(int(match[1]))
            if self._echo(line):
                print(f"  {self.name:>13} | {line}", flush=True)
            if self._on_line is not None:
                self._on_line(self, line)

    def _echo(self, line: str) -> bool:
        """Echoes every line but step lines, of which only every 10th and the first."""
        match = _STEP.search(line)
        return match is None or int(match[1]) % 10 == 0 or self._first_step(int(match[1]))

    def _first_step(self, step: int) -> bool:
        first = not getattr(self, "_stepped", False)
        self._stepped = True
        return first

    def wait(self, timeout: float = 330) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def run_preempted(directory: Path, args) -> dict:
    """Phase 1: 2 x 4 devices on (4, 2), SIGKILLed after a committed checkpoint."""
    print(f"\n== 1. train on 2 processes x 4 devices, mesh (4, 2); preempt after a "
          f"checkpoint at step >= {args.preempt_after}")  # fmt: skip
    fired = threading.Event()
    victims: list[int] = []

    def watch(job: Job, line: str) -> None:
        match = _COMMITTED.search(line)
        if match and int(match[1]) >= args.preempt_after and not fired.is_set():
            fired.set()
            # A real preemption: SIGKILL every rank, no handler or atexit runs.
            victims.extend(_sigkill(pid) for pid in job.pids)

    job = Job("preempted", 2, 4, _train_args(directory, args, "4x2", args.step_sleep))
    job.start(watch)
    code = job.wait()
    if not fired.is_set():
        raise SystemExit(f"demo: the job ended (exit {code}) before it could be preempted; "
                         "raise --step-sleep or lower --preempt-after")  # fmt: skip
    print(f"  SIGKILLed ranks (pids {victims}) at step {job.last_step}; mpiexec exited "
          f"{code}; {job.other_lines} lines of MPI/JAX teardown output hidden")  # fmt: skip
    on_disk = sorted(n for n in os.listdir(directory) if not n.startswith("."))  # no lock
    return {"killed_pids": victims, "exit_code": code, "last_step": job.last_step,
            "committed": job.committed, "on_disk": on_disk}  # fmt: skip


def run_sigtermed(directory: Path, args) -> dict:
    """Phase 3: 2 x 4 devices on (4, 2), ``--save-on-preemption``, SIGTERM to rank 1 only.

    The signal is sent when this process reads the job's step line, which a loaded
    machine can delay by seconds while the job trains on; if the job then reaches its
    last step before the save it agreed on, the run is repeated once with slower
    steps (the notice came too late to matter, which says nothing about the library;
    a notice in time that is not saved fails both runs).
    """
    print(f"\n== 3. train again on 2 processes x 4 devices, saving on preemption; at step "
          f">= {args.preempt_after} send SIGTERM to rank 1 only")  # fmt: skip
    step_sleep = args.step_sleep
    for attempt in (1, 2):
        sent: list[int] = []

        def watch(job: Job, line: str, sent=sent) -> None:
            match = _STEP.search(line)
            if match and int(match[1]) >= args.preempt_after and not sent:
                # A preemption notice on one host: the ranks must still agree on one step.
                sent.extend([_signal(job.pids[1], signal.SIGTERM), int(match[1])])

        shutil.rmtree(directory, ignore_errors=True)
        train_args = _train_args(directory, args, "4x2", step_sleep)
        job = Job("sigtermed", 2, 4, [*train_args, "--save-on-preemption"])
        job.start(watch)
        code = job.wait()
        if sent and job.preemption_step is not None:
            break
        print(f"  attempt {attempt}: the job ended (exit {code}) at step {job.last_step} "
              f"without a preemption save, SIGTERM sent after its step line "
              f"{sent[1] if sent else None} was read")  # fmt: skip
        step_sleep *= 4
    else:
        raise SystemExit(f"demo: the job ended (exit {code}) without a preemption save; "
                         "raise --step-sleep or lower --preempt-after")  # fmt: skip
    print(f"  SIGTERM to rank 1 (pid {sent[0]}) after step {sent[1]}; both ranks saved at "
          f"step {job.preemption_step} and exited {code}")  # fmt: skip
    return {"sigterm_pid": sent[0], "sigterm_after_step": sent[1], "exit_code": code,
            "last_step": job.last_step, "attempts": attempt,
            "committed": job.committed, "preemption_step": job.preemption_step}


def run_local_tier(workdir: Path, args) -> dict:
    """Phase 5: local saves every 2 steps; SIGKILL once a local step is newer than
    every persistent checkpoint; wipe rank 1's host directory; resume renumbered."""
    print("\n== 5. train with a local tier (every 2 steps) beside the persistent one; "
          "SIGKILL once a local step is newer than every persistent checkpoint")
    directory, hosts = workdir / "local-run", _local_hosts(workdir)
    local = ["--local-dir", str(hosts), "--local-every", "2"]
    fired = threading.Event()
    seen: dict = {}

    def watch(job: Job, line: str) -> None:
        newest = max(job.local_committed, default=0)
        if (_LOCAL.search(line) and newest >= args.preempt_after and not fired.is_set()
                and newest > max(job.committed, default=0)):
            fired.set()
            seen.update(local=newest, persistent=list(job.committed))
            for pid in job.pids:
                _sigkill(pid)

    job = Job("local tier", 2, 4, [*_train_args(directory, args, "4x2", args.step_sleep),
                                   *local, "--host-order", "0,1"])
    code = job.start(watch).wait()
    if not fired.is_set():
        raise SystemExit(f"demo: the local-tier job ended (exit {code}) before a local "
                         "step passed the persistent ones; raise --step-sleep")
    shutil.rmtree(hosts / "host1")  # a replaced host: its local disk is empty
    print(f"  SIGKILLed both ranks at step {job.last_step}: local steps committed "
          f"{job.local_committed}, persistent {job.committed}; wiped {hosts / 'host1'}")
    print("\n== 5b. resume with ranks renumbered (rank 0 gets the wiped host1, rank 1 "
          "host0) on 2 processes x 4 devices, mesh (2, 4)")
    out = workdir / "local-resumed.npz"
    resumed = Job("local resumed", 2, 4, [
        *_train_args(directory, args, "2x4", 0.0), *local, "--host-order", "1,0",
        "--final-out", str(out)]).start()
    code = resumed.wait()
    shutil.rmtree(hosts, ignore_errors=True)
    if code != 0 or resumed.result is None:
        raise SystemExit("demo: the local-tier resume failed")
    import numpy as np

    with np.load(out) as arrays:
        params = {key: arrays[key] for key in arrays.files}
    return {"killed_at": job.last_step, "local_committed": job.local_committed,
            "persistent_committed": job.committed, "at_kill": seen,
            "resumed": resumed.result}, params


def _local_hosts(workdir: Path) -> Path:
    """Where the local phase's host directories go: tmpfs if this machine has one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        hosts = Path(tempfile.mkdtemp(prefix="dcheckpoint-demo-local-", dir=shm))
    else:
        hosts = workdir / "local-hosts"
    hosts.mkdir(parents=True, exist_ok=True)
    return hosts


def _signal(pid: int, signum: int) -> int:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    return pid


def _sigkill(pid: int) -> int:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return pid


def run_to_end(name: str, directory: Path, args, processes: int, devices: int, mesh: str):
    """Phases 2 and 3: one job run to ``--steps``; returns its RESULT and final params."""
    import numpy as np

    out = directory.parent / f"{name}.npz"
    job = Job(name, processes, devices, [*_train_args(directory, args, mesh, 0.0),
                                         "--final-out", str(out)]).start()  # fmt: skip
    code = job.wait()
    if code != 0 or job.result is None:
        print(f"  ({job.other_lines} non-[train] output lines were hidden; rerun train.py "
              "by hand to see them)")  # fmt: skip
        raise SystemExit(f"demo: the {name} run failed with exit code {code}")
    with np.load(out) as arrays:
        return job.result, {key: arrays[key] for key in arrays.files}


def _train_args(directory: Path, args, mesh: str, step_sleep: float) -> list[str]:
    return [
        "--dir", str(directory), "--mesh", mesh, "--steps", str(args.steps),
        "--save-every", str(args.save_every), "--seed", str(args.seed),
        "--step-sleep", str(step_sleep),
    ]  # fmt: skip


def compare(resumed: dict, uninterrupted: dict) -> dict:
    """Bit-for-bit comparison of two parameter dicts (and the largest difference)."""
    import numpy as np

    identical = {
        key: bool(np.array_equal(resumed[key], uninterrupted[key]))
        and resumed[key].tobytes() == uninterrupted[key].tobytes()
        for key in uninterrupted
    }
    max_diff = max(float(np.max(np.abs(resumed[k] - uninterrupted[k]))) for k in uninterrupted)
    return {"identical": identical, "max_abs_diff": max_diff}


def run_scenario(args, workdir: Path) -> dict:
    """Runs every phase in ``workdir`` and returns every fact the summary reports."""
    started = time.monotonic()
    preempted = run_preempted(workdir / "run", args)
    print("\n== 2. resume the same directory on 1 process x 8 devices, mesh (2, 4)")
    resumed, resumed_params = run_to_end("resumed", workdir / "run", args, 1, 8, "2x4")
    sigtermed = run_sigtermed(workdir / "sigterm", args)
    print("\n== 4. resume the SIGTERMed directory on 1 process x 8 devices, mesh (2, 4)")
    resumed_term, resumed_term_params = run_to_end(
        "resumed (TERM)", workdir / "sigterm", args, 1, 8, "2x4"
    )
    local_tier, local_params = run_local_tier(workdir, args)
    print("\n== 6. the same job, uninterrupted, on 2 processes x 4 devices, mesh (4, 2)")
    baseline, baseline_params = run_to_end(
        "uninterrupted", workdir / "baseline", args, 2, 4, "4x2"
    )
    comparison = compare(resumed_params, baseline_params)
    comparison_term = compare(resumed_term_params, baseline_params)
    comparison_local = compare(local_params, baseline_params)
    return {
        "preempted": preempted,
        "resumed": resumed,
        "sigtermed": sigtermed,
        "resumed_sigterm": resumed_term,
        "uninterrupted": baseline,
        "params_identical": all(comparison["identical"].values()),
        "loss_identical": resumed["loss_hex"] == baseline["loss_hex"],
        "sigterm_params_identical": all(comparison_term["identical"].values()),
        "sigterm_loss_identical": resumed_term["loss_hex"] == baseline["loss_hex"],
        "sigterm_max_abs_diff": comparison_term["max_abs_diff"],
        "local_tier": local_tier,
        "local_params_identical": all(comparison_local["identical"].values()),
        "local_loss_identical": local_tier["resumed"]["loss_hex"] == baseline["loss_hex"],
        "local_max_abs_diff": comparison_local["max_abs_diff"],
        **comparison,
        "save_every": args.save_every,
        "seconds": round(time.monotonic() - started, 1),
    }


def matched(facts: dict) -> bool:
    """Both resumed runs equal the uninterrupted one, bit for bit."""
    return all(facts[k] for k in ("params_identical", "loss_identical",
                                  "sigterm_params_identical", "sigterm_loss_identical",
                                  "local_params_identical", "local_loss_identical"))


def summarize(facts: dict) -> str:
    p, r, u = facts["preempted"], facts["resumed"], facts["uninterrupted"]
    t, rt = facts["sigtermed"], facts["resumed_sigterm"]
    lt, lr = facts["local_tier"], facts["local_tier"]["resumed"]
    match = matched(facts)
    lines = [
        "",
        "== Summary",
        f"  preempted : 2 proc x 4 dev, mesh (4,2), SIGKILL at step {p['last_step']}; "
        f"checkpoints committed {p['committed']}, on disk after the kill {p['on_disk']}",
        f"  resumed   : 1 proc x 8 dev, mesh (2,4), from {os.path.basename(r['restored_from'])}"
        f" (step {r['start_step']}) to step {r['step']}, loss {r['loss']:.9g}",
        f"  reference : uninterrupted 2 proc x 4 dev, mesh (4,2), step {u['step']}, "
        f"loss {u['loss']:.9g}",
        f"  params    : {'bit-identical' if facts['params_identical'] else 'DIFFERENT'} "
        f"({', '.join(facts['identical'])}; max |diff| {facts['max_abs_diff']:g})",
        f"  loss      : {'bit-identical' if facts['loss_identical'] else 'DIFFERENT'} "
        f"({r['loss_hex']} vs {u['loss_hex']})",
        f"  SIGTERM   : 2 proc x 4 dev, notice to rank 1 only after step "
        f"{t['sigterm_after_step']}; both ranks agreed, saved ckpt-{t['preemption_step']}, "
        f"exited {t['exit_code']}",
        f"  resumed   : 1 proc x 8 dev from step {rt['start_step']} to {rt['step']}: params "
        f"{'bit-identical' if facts['sigterm_params_identical'] else 'DIFFERENT'}, loss "
        f"{'bit-identical' if facts['sigterm_loss_identical'] else 'DIFFERENT'}",
        f"  local tier: local every 2 steps, persistent every {facts['save_every']}; "
        f"SIGKILL at step {lt['killed_at']} (local steps {lt['local_committed']}, "
        f"persistent {lt['persistent_committed']}); host1 wiped",
        f"  resumed   : ranks renumbered, mesh (2,4), from the {lr['restored_tier']} "
        f"(persistent had {max(lt['persistent_committed'], default=None)}) to step "
        f"{lr['step']}: params "
        f"{'bit-identical' if facts['local_params_identical'] else 'DIFFERENT'}, loss "
        f"{'bit-identical' if facts['local_loss_identical'] else 'DIFFERENT'}",
        "  why exact : same (seed, step) batches on every mesh, and every cross-device sum is"
        " added in one fixed order (scripts/train.py)",
        f"  result    : {'MATCH' if match else 'MISMATCH'} in {facts['seconds']} s",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--preempt-after", type=int, default=30,
                        help="SIGKILL once a checkpoint at this step or later is committed")
    parser.add_argument("--step-sleep", type=float, default=0.1,
                        help="per-step pause of the preempted run, so the kill lands mid-run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--json-out", help="also write the facts of the summary as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.preempt_after < args.steps:
        parser.error("--preempt-after must be between 0 and --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dcheckpoint-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        facts = run_scenario(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summarize(facts), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(facts, indent=2))
    return 0 if matched(facts) else 1


if __name__ == "__main__":
    sys.exit(main())
