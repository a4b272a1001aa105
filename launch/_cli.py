"""``python -m launch -n P --devices-per-process D script.py args...``.

Runs ``mpiexec -n P <this python> script.py args`` so one line starts a P-process job,
each process seeing D emulated CPU devices. The script calls ``launch.initialize()``
first thing to join the processes into one JAX job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from launch._devices import xla_flags_with_device_count

__all__ = ["main", "find_mpiexec", "TIMEOUT_EXIT_CODE"]

TIMEOUT_EXIT_CODE = 124  # what coreutils' timeout(1) returns, so shells read it the same way


def find_mpiexec() -> str:
    """Returns the mpiexec to use: the one next to this Python first, then PATH's.

    The venv's own mpiexec (from the ``mpich`` wheel) matches the MPI that mpi4py was
    built against; a system one from another MPI would start processes that cannot talk.

    Raises:
        FileNotFoundError: no mpiexec in the Python's bin directory or on PATH.
    """
    beside_python = Path(sys.executable).parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("mpiexec")
    if on_path:
        return on_path
    raise FileNotFoundError(
        f"mpiexec not found next to {sys.executable} nor on PATH; install an MPI into "
        "this environment (`pip install mpich mpi4py`) or put mpiexec on PATH"
    )


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Start a multi-process JAX job under mpiexec.",
    )
    parser.add_argument("-n", "--processes", type=int, required=True, help="process count")
    parser.add_argument(
        "--devices-per-process", type=int, default=None,
        help="emulated CPU devices per process (sets XLA_FLAGS and JAX_PLATFORMS=cpu)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None,
        help="seconds after which the whole job is killed (exit code 124)",
    )
    parser.add_argument("script", help="Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"-n must be at least 1, got {args.processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    return args


def _job_environment(devices_per_process: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if devices_per_process is not None:
        env["XLA_FLAGS"] = xla_flags_with_device_count(env.get("XLA_FLAGS"), devices_per_process)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def main(argv: list[str] | None = None) -> int:
    """Runs the job and returns mpiexec's exit code (124 if ``--timeout`` expired)."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mpiexec = find_mpiexec()
    except FileNotFoundError as error:
        print(f"launch: {error}", file=sys.stderr)
        return 127
    command = [mpiexec, "-n", str(args.processes), sys.executable, args.script, *args.args]
    # A session of its own lets a timeout kill mpiexec and every rank it started.
    process = subprocess.Popen(
        command, env=_job_environment(args.devices_per_process), start_new_session=True
    )
    try:
        return process.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _kill_job(process)
        print(f"launch: job timed out after {args.timeout}s and was killed", file=sys.stderr)
        return TIMEOUT_EXIT_CODE
    except KeyboardInterrupt:
        _kill_job(process)
        raise


def _kill_job(process: subprocess.Popen) -> None:
    """Terminates mpiexec's process group, then kills what is left after 5 seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
