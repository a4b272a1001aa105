"""launch/: CPU device emulation, the mpiexec bootstrap and ``python -m launch``."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import launch
from launch._devices import xla_flags_with_device_count
from tests.mp_util import REPO_ROOT, results, run_launch

WORKERS = Path(__file__).parent / "workers"


def test_two_processes_of_four_devices_share_one_eight_device_mesh():
    completed = run_launch(WORKERS / "launch_worker.py", processes=2, devices_per_process=4)
    rank0, rank1 = results(completed)
    for rank, result in enumerate((rank0, rank1)):
        assert result["rank"] == result["jax_process_index"] == rank
        assert result["process_count"] == result["jax_process_count"] == 2
        assert result["global_devices"] == 8
        assert result["local_devices"] == 4
        assert result["initialize_again"] == [rank, 2]  # idempotent
    assert rank0["mesh_device_ids"] == rank1["mesh_device_ids"]
    # Mesh rows 0-1 hold process 0's devices, rows 2-3 process 1's; an x block is 2 rows
    # of the (8, 4) array and a y block 2 columns, so process 0 owns rows [0, 4).
    assert [index for index, _ in rank0["shards"]] == [
        [[0, 2], [0, 2]], [[0, 2], [2, 4]], [[2, 4], [0, 2]], [[2, 4], [2, 4]],
    ]  # fmt: skip
    assert [index for index, _ in rank1["shards"]] == [
        [[4, 6], [0, 2]], [[4, 6], [2, 4]], [[6, 8], [0, 2]], [[6, 8], [2, 4]],
    ]  # fmt: skip
    for index, data in rank0["shards"] + rank1["shards"]:
        (row_start, row_stop), (col_start, col_stop) = index
        expected = [[4 * r + c for c in range(col_start, col_stop)]
                    for r in range(row_start, row_stop)]  # fmt: skip
        assert data == expected


def test_exit_code_of_the_job_is_returned(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(3)\n")
    completed = run_launch(script, processes=2, devices_per_process=1, check=False)
    assert completed.returncode == 3


def test_timeout_kills_the_job(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(120)\n")
    completed = run_launch(script, processes=2, devices_per_process=1, timeout=1, check=False)
    assert completed.returncode == 124
    assert "timed out after 1.0s" in completed.stderr


def test_script_arguments_reach_every_rank(tmp_path):
    script = tmp_path / "echo.py"
    script.write_text(
        "import json, os, sys\n"
        "print('RESULT ' + json.dumps({'rank': int(os.environ['PMI_RANK']), "
        "'argv': sys.argv[1:], 'xla': os.environ['XLA_FLAGS']}), flush=True)\n"
    )
    completed = run_launch(script, "--lr", "0.5", processes=2, devices_per_process=3)
    for rank, result in enumerate(results(completed)):
        assert result == {
            "rank": rank,
            "argv": ["--lr", "0.5"],
            "xla": "--xla_force_host_platform_device_count=3",
        }


def test_initialize_outside_mpi_is_a_single_process_no_op():
    assert not launch.is_mpi_launched()
    assert launch.initialize() == launch.LaunchInfo(process_index=0, process_count=1)


def test_device_count_flag_replaces_an_existing_one():
    flags = "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8 --other"
    assert xla_flags_with_device_count(flags, 3) == (
        "--xla_dump_to=/tmp/x --other --xla_force_host_platform_device_count=3"
    )
    assert xla_flags_with_device_count(None, 2) == "--xla_force_host_platform_device_count=2"


def test_emulate_cpu_devices_rejects_a_non_positive_count():
    with pytest.raises(ValueError, match="positive device count, got 0"):
        launch.emulate_cpu_devices(0)


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT),
           "XLA_FLAGS": "--xla_dump_hlo_as_text --xla_force_host_platform_device_count=2"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_emulate_cpu_devices_before_the_backend_starts_takes_effect():
    completed = _run_python(
        """
        import os, jax, launch
        launch.emulate_cpu_devices(3)
        print(jax.device_count(), os.environ["XLA_FLAGS"], os.environ["JAX_PLATFORMS"])
        """
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == [
        "3", "--xla_dump_hlo_as_text", "--xla_force_host_platform_device_count=3", "cpu",
    ]  # fmt: skip


def test_emulate_cpu_devices_after_the_backend_started_says_it_is_too_late():
    completed = _run_python(
        """
        import jax, launch
        assert jax.device_count() == 2
        launch.emulate_cpu_devices(2)  # the count already running: nothing to do
        print("same count ok", flush=True)
        launch.emulate_cpu_devices(4)
        """
    )
    assert completed.returncode == 1
    assert "same count ok" in completed.stdout
    assert (
        "RuntimeError: emulate_cpu_devices(4) was called after JAX initialised its backend "
        "with 2 CPU device(s); it is too late" in completed.stderr
    )
    assert "Call launch.emulate_cpu_devices() before anything touches JAX devices" in (
        completed.stderr
    )
