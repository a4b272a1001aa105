"""Crash consistency under real SIGKILLs at seeded random moments.

A worker process (tests/workers/crash_worker.py) runs a CheckpointManager that saves
checkpoint N with values derived from N; the test kills it with SIGKILL and then checks
the directory: the state file names a committed checkpoint no older than the last save
that returned, every committed checkpoint restores bit-identically to what was saved
under its number, and a new manager removes what the crash left.
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._manager import CheckpointManager
from dcheckpoint._variable import Variable
from tests.mp_util import REPO_ROOT
from tests.workers import crash_worker

TRIALS = 24
SEED = 20240607
WORKER = REPO_ROOT / "tests" / "workers" / "crash_worker.py"


def _worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _check_after_crash(directory: str, saved_so_far: list[int]) -> dict:
    facts = crash_worker.check_directory(directory)
    assert facts["mismatches"] == [], facts  # never a mix of two saves
    if saved_so_far:
        # A save that returned is durable: the state file names it or a newer one.
        assert facts["latest"] is not None, facts
        assert facts["latest"] >= max(saved_so_far), (facts, max(saved_so_far))
    if facts["latest"] is not None:
        assert facts["latest"] in facts["committed"], facts
    return facts


def _new_manager_cleans(directory: str, latest: int | None) -> None:
    variables = {k: Variable(np.zeros_like(v)) for k, v in crash_worker.expected_values(0).items()}
    manager = CheckpointManager(
        Checkpoint(**variables), directory, max_to_keep=crash_worker.MAX_TO_KEEP,
        checkpoint_name=crash_worker.CHECKPOINT_NAME,
    )
    assert [n for n in os.listdir(directory) if ".tmp-" in n] == []
    expected = None if latest is None else os.path.join(directory, f"ckpt-{latest}")
    assert manager.latest_checkpoint == expected
    if latest is not None:
        manager.restore_or_initialize()
        want = crash_worker.expected_values(latest)["weights"]
        np.testing.assert_array_equal(np.asarray(variables["weights"].value), want)


def test_sigkill_at_random_moments_leaves_a_consistent_directory(tmp_path):
    rng = random.Random(SEED)
    directory = str(tmp_path / "run")
    os.makedirs(directory)
    saved_so_far: list[int] = []
    leftovers_seen = 0
    for trial in range(TRIALS):
        after_ready = trial % 4 != 3  # every 4th kill lands in start-up or cleanup
        delay = rng.uniform(0.0, 0.3) if after_ready else rng.uniform(0.3, 1.5)
        outcome = crash_worker.kill_trial(
            directory, delay_secs=delay, after_ready=after_ready,
            use_async=trial % 2 == 1, env=_worker_env(),
        )
        assert outcome["returncode"] == -signal.SIGKILL, (trial, outcome)
        saved_so_far += outcome["saved"]
        facts = _check_after_crash(directory, saved_so_far)
        leftovers_seen += bool(facts["leftovers"])
        # Half the time the next worker cleans up; otherwise a manager here does.
        if trial % 2 == 0:
            _new_manager_cleans(directory, facts["latest"])
    assert len(saved_so_far) >= TRIALS // 2  # the kills did land among saves
    print(f"{TRIALS} kills, {len(saved_so_far)} saves returned, "
          f"{leftovers_seen} crashes left temporaries")


def _start_mpi_job(directory: str, pid_directory: str, timeout_secs: float):
    command = [
        sys.executable, "-m", "launch", "-n", "2", "--devices-per-process", "2",
        "--timeout", "90", str(WORKER), "mpi", directory, pid_directory, str(timeout_secs),
    ]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=_worker_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_pid(path: str, job) -> int:
    while not os.path.exists(path):
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.05)
    time.sleep(0.01)
    with open(path) as f:
        return int(f.read())


def test_one_rank_of_an_mpi_job_killed(tmp_path):
    rng = random.Random(SEED + 1)
    directory, pid_directory = str(tmp_path / "run"), str(tmp_path / "pids")
    os.makedirs(directory)
    os.makedirs(pid_directory)
    job = _start_mpi_job(directory, pid_directory, timeout_secs=5.0)
    victim = _wait_for_pid(os.path.join(pid_directory, "rank1.pid"), job)
    time.sleep(rng.uniform(0.5, 1.5))
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=120)
    # Bounded: the survivor was torn down by mpiexec or raised within its timeout, long
    # before launch's own 90 s limit (which would exit 124).
    assert job.returncode not in (0, 124), output
    survivor_raised = "CoordinationTimeoutError" in output or "CoordinationError" in output
    torn_down = "KILLED BY SIGNAL" in output or "BAD TERMINATION" in output
    assert survivor_raised or torn_down, output
    facts = crash_worker.check_directory(directory)
    assert facts["mismatches"] == []
    assert facts["latest"] is not None and facts["latest"] in facts["committed"], facts
    _new_manager_cleans(directory, facts["latest"])
