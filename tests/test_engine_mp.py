"""The engine across real processes: save with 2 processes x 4 devices, restore with
1 x 8, 4 x 2 and into host numpy, each on a different mesh than the save."""

import os

import pytest

from tests.ckpt_files import array_dir
from tests.mp_util import REPO_ROOT, results, run_launch, save_with_two_processes

WORKER = REPO_ROOT / "tests" / "workers" / "engine_worker.py"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_with_two_processes(WORKER, str(tmp_path_factory.mktemp("mp") / "ckpt"))


def test_save_by_two_processes_writes_each_chunk_once(saved):
    # w (16, 8) on (4, 2) with P("x", "y"): 4 x 2 chunks of (4, 4), one file each.
    chunk_files = [f for d, _, fs in os.walk(array_dir(saved, "model/w"))
                   for f in fs if f != "zarr.json"]
    assert len(chunk_files) == 8
    assert not [p for p in os.listdir(os.path.dirname(saved)) if ".tmp-" in p]


@pytest.mark.parametrize(
    ("processes", "devices", "mesh"),
    [(1, 8, "2x4"), (4, 2, "8x1"), (2, 4, "4x2")],
    ids=["1proc_2x4", "4proc_8x1", "2proc_4x2"],
)
def test_restore_on_other_process_counts_and_meshes(saved, processes, devices, mesh):
    out = results(run_launch(WORKER, "restore", saved, mesh, processes=processes,
                             devices_per_process=devices))
    assert len(out) == processes
    for r in out:
        assert r["bad"] == [] and r["step"] == 42 and r["devices"] == processes * devices
        assert r["local"] == [7.0, 7.0, 7.0]  # process 0's copy of a process-local value
        assert r["checked"] == 4 * devices  # every local device's shard of 4 arrays


def test_restore_into_host_numpy(saved):
    out = results(run_launch(WORKER, "restore", saved, "host", processes=2,
                             devices_per_process=1))
    assert [(r["bad"], r["checked"]) for r in out] == [([], 4), ([], 4)]


def test_processes_saving_different_trees_all_raise_the_same_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    out = results(run_launch(WORKER, "mismatch", directory, "none", processes=2,
                             devices_per_process=1))
    assert out[0]["error"] == out[1]["error"]
    assert out[0]["type"] == out[1]["type"] == "CoordinationError"
    assert out[0]["error"].startswith(
        "The processes are not saving the same checkpoint, so nothing was written or "
        "committed; they disagree on the number of arrays (processes [0]: 1, processes "
        "[1]: 2); the array table (paths, shapes, dtypes) (processes [0]: ")
    assert os.listdir(tmp_path) == []  # nothing committed, no staging left
