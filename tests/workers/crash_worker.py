"""A training loop that saves numbered checkpoints until something SIGKILLs it.

Run by tests/test_reliability_crash.py and scripts/soak.py. Every value saved under
checkpoint number N is a pure function of N (:func:`expected_values`), so whoever killed
the process can check that a checkpoint restores to exactly what was saved under its
number: the old checkpoint or the new one, never a mix.

Modes:
  single DIR ASYNC       one process: a CheckpointManager resumes DIR (restoring the
                         latest checkpoint) and saves N+1, N+2, ... forever. Prints
                         ``READY {pid}`` once the manager is up and ``SAVED {n}`` after
                         each save has returned (and, for async saves, synced).
  mpi DIR PIDDIR TIMEOUT under ``python -m launch -n 2``: every rank writes its pid to
                         PIDDIR/rank{r}.pid and saves forever with
                         CheckpointOptions(timeout_secs=TIMEOUT). A rank whose save raises
                         prints ``RESULT {...}`` naming the error and exits 3.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

MAX_TO_KEEP = 2
CHECKPOINT_NAME = "ckpt"


# Saves pack every leaf of at most PACK_BELOW bytes per shard ("counts", "flags",
# "save_counter"; not "weights"): every save the kills land in is packed and unpacked.
PACK_BELOW = 64


def _packing_options(**kwargs):
    """CheckpointOptions that pack the small leaves here, though there are only three."""
    from dcheckpoint import _packing
    from dcheckpoint._options import CheckpointOptions

    _packing.PACK_MIN_ARRAYS = 2
    return CheckpointOptions(pack_below_bytes=PACK_BELOW, **kwargs)


def expected_values(number: int) -> dict[str, np.ndarray]:
    """What checkpoint ``number`` holds, by logical name (small, three dtypes)."""
    return {
        "weights": (np.arange(96, dtype=np.float32).reshape(12, 8) + number) * 0.5,
        "counts": np.arange(10, dtype=np.int32) * number - 7,
        "flags": ((np.arange(16) + number) % 3).astype(np.uint8),
    }


def kill_trial(directory: str, *, delay_secs: float, after_ready: bool, use_async: bool,
               env: dict | None = None) -> dict:
    """Starts a ``single`` worker on ``directory`` and SIGKILLs it after ``delay_secs``.

    Args:
      delay_secs: how long after the worker printed READY (``after_ready``) or after
        it was started (otherwise: the kill may land in imports, the manager's start,
        its cleanup of leftovers or the restore) to send SIGKILL.

    Returns:
      {"saved": [numbers whose save returned before the kill], "killed": whether the
       SIGKILL found the process alive, "returncode": ...}.
    """
    command = [sys.executable, os.path.abspath(__file__), "single", directory,
               "1" if use_async else "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    if after_ready:
        while True:
            line = process.stdout.readline()
            if not line or line.startswith("READY"):
                break
            lines.append(line)
    time.sleep(delay_secs)
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    lines.extend(process.stdout.read().splitlines())
    process.wait()
    saved = [int(line.split()[1]) for line in lines if line.startswith("SAVED ")]
    return {"saved": saved, "killed": killed, "returncode": process.returncode}


def checkpoint_number(path: str) -> int:
    return int(os.path.basename(path).rsplit("-", 1)[1])


def check_directory(directory: str) -> dict:
    """Restores every committed checkpoint of ``directory`` and compares it bit for bit.

    Runs in the checking process (not a worker). Creates no manager, so what a crash
    left is still there to be counted.

    Returns:
      {"latest": number named by the state file or None, "committed": [numbers],
       "mismatches": [(number, name)], "leftovers": [``*.tmp-*`` names]}.
    """
    from dcheckpoint._checkpoint import Checkpoint
    from dcheckpoint._engine import read_metadata
    from dcheckpoint._state_file import is_committed, latest_checkpoint
    from dcheckpoint._variable import Variable

    latest = latest_checkpoint(directory)
    names = sorted(os.listdir(directory))
    committed = sorted(
        checkpoint_number(n) for n in names
        if n.startswith(CHECKPOINT_NAME + "-") and ".tmp-" not in n
        and is_committed(os.path.join(directory, n))
    )
    mismatches = []
    for number in committed:
        variables = {k: Variable(np.zeros_like(v)) for k, v in expected_values(0).items()}
        Checkpoint(**variables).restore(os.path.join(directory, f"{CHECKPOINT_NAME}-{number}"))
        for name, want in expected_values(number).items():
            got = np.asarray(variables[name].value)
            if got.dtype != want.dtype or got.tobytes() != want.tobytes():
                mismatches.append((number, name))
        packed = read_metadata(os.path.join(directory, f"{CHECKPOINT_NAME}-{number}")).packed
        if packed is None or sorted(packed.members) != ["counts", "flags", "save_counter"]:
            mismatches.append((number, "not packed as expected"))
    return {
        "latest": None if latest is None else checkpoint_number(latest),
        "committed": committed,
        "mismatches": mismatches,
        "leftovers": [n for n in names if ".tmp-" in n],
    }


def _put(jax_module, name: str, value, sharding):
    """Host values in one process; in a job, weights sharded and the rest replicated."""
    if sharding is None:
        return value
    if name != "weights":
        sharding = jax_module.sharding.NamedSharding(
            sharding.mesh, jax_module.sharding.PartitionSpec()
        )
    return jax_module.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def _variables(jax_module, sharding=None):
    from dcheckpoint._variable import Variable

    return {
        name: Variable(_put(jax_module, name, value, sharding))
        for name, value in expected_values(0).items()
    }


def _assign(variables, number: int, jax_module, sharding=None) -> None:
    for name, value in expected_values(number).items():
        variables[name].assign(_put(jax_module, name, value, sharding))


def _start_number(manager) -> int:
    latest = manager.restore_or_initialize()
    return 1 if latest is None else int(latest.rsplit("-", 1)[1]) + 1


def run_single(directory: str, use_async: str) -> None:
    import jax

    from dcheckpoint._checkpoint import Checkpoint
    from dcheckpoint._manager import CheckpointManager

    variables = _variables(jax)
    manager = CheckpointManager(
        Checkpoint(**variables), directory, max_to_keep=MAX_TO_KEEP,
        checkpoint_name=CHECKPOINT_NAME,
    )
    options = _packing_options(enable_async=use_async == "1")
    number = _start_number(manager)
    print(f"READY {os.getpid()}", flush=True)
    while True:
        _assign(variables, number, jax)
        manager.save(checkpoint_number=number, options=options)
        manager.sync()
        print(f"SAVED {number}", flush=True)
        number += 1


def run_mpi(directory: str, pid_directory: str, timeout_secs: str) -> None:
    import launch

    info = launch.initialize()

    import jax

    from dcheckpoint._checkpoint import Checkpoint
    from dcheckpoint._manager import CheckpointManager
    from dcheckpoint.errors import CheckpointError

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    variables = _variables(jax, sharding)
    options = _packing_options(timeout_secs=float(timeout_secs))
    rank = info.process_index
    try:
        manager = CheckpointManager(
            Checkpoint(**variables), directory, max_to_keep=MAX_TO_KEEP,
            checkpoint_name=CHECKPOINT_NAME,
        )
        number = _start_number(manager)
        with open(os.path.join(pid_directory, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        while True:
            _assign(variables, number, jax, sharding)
            manager.save(checkpoint_number=number, options=options)
            number += 1
    except CheckpointError as error:
        print("RESULT " + json.dumps(
            {"rank": rank, "error": type(error).__name__, "message": str(error)[:500]}
        ), flush=True)
        os._exit(3)  # do not wait in MPI_Finalize for a peer that is gone


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"single": run_single, "mpi": run_mpi}[mode](*args)
