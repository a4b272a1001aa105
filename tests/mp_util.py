"""Run a script as a real multi-process job (``python -m launch``) from a test.

Worker scripts print one line per fact they want checked, ``RESULT {json}``; the test
reads them back with :func:`results` and asserts on the values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

__all__ = ["REPO_ROOT", "RESULT_MARKER", "results", "run_launch"]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "RESULT "


def run_launch(
    script: str | Path,
    *args: str,
    processes: int,
    devices_per_process: int,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``python -m launch -n processes --devices-per-process D script args...``.

    Uses this interpreter (the venv's), so the job imports the same packages and finds
    the venv's mpiexec. Output is captured; with ``check`` a non-zero exit fails the test
    and shows both streams.

    Args:
        script: path of the worker script.
        *args: arguments passed to the script (converted with ``str``).
        processes: MPI process count.
        devices_per_process: emulated CPU devices each process sees.
        timeout: seconds before the whole job is killed (exit code 124).
        check: fail the test on a non-zero exit code.

    Returns:
        The finished process, with ``stdout`` and ``stderr`` as text.
    """
    command = [
        sys.executable, "-m", "launch",
        "-n", str(processes),
        "--devices-per-process", str(devices_per_process),
        "--timeout", str(timeout),
        str(script), *map(str, args),
    ]  # fmt: skip
    # The working tree first on the path, so workers import these sources even when the
    # editable install's finder predates a package's __init__.py.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout + 30
    )
    if check and completed.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited with {completed.returncode}\n"
            f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}",
            pytrace=False,
        )
    return completed


def results(completed: subprocess.CompletedProcess, key: str = "rank") -> list[dict]:
    """Returns the ``RESULT`` JSON objects the job printed, sorted by ``key``.

    mpiexec forwards each rank's output in chunks, so one rank's line may end up glued
    to another's; each object is therefore decoded from its marker, not per line. Print
    each result with one ``print(..., flush=True)`` so it leaves the process in one piece.
    """
    decoder = json.JSONDecoder()
    text = completed.stdout
    found = []
    start = text.find(RESULT_MARKER)
    while start != -1:
        value, end = decoder.raw_decode(text, start + len(RESULT_MARKER))
        found.append(value)
        start = text.find(RESULT_MARKER, end)
    return sorted(found, key=lambda result: result[key])


def save_with_two_processes(worker, directory: str) -> str:
    """Runs ``worker save DIR 4x2`` as 2 processes x 4 devices; checks that both ranks
    report the committed ``directory`` and returns it (the shared saved fixture)."""
    out = results(run_launch(worker, "save", directory, "4x2", processes=2,
                             devices_per_process=4))
    assert [r["path"] for r in out] == [directory, directory]
    return directory
