"""Issue 22 at 16 real processes (mpiexec, one CPU device each, oversubscribed): an
FSDP-like state saved twice (the second save steady: fingerprints, not chunk lists),
restored bit-identical on 16, on 3 (each process's slice spans 5 1/3 saved shards) and
on 1; a process that raises, then one that hangs, mid-save: a clean error on every
survivor, naming it. Worker: scripts/scale_worker.py."""

import pytest

from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "scripts" / "scale_worker.py"
ARRAYS = 80  # >= 64 small arrays at 16 processes: the packed path too
PROCESSES = 16


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scale") / "ckpt"
    out = results(run_launch(WORKER, "save+fail", directory, ARRAYS, processes=PROCESSES,
                             devices_per_process=1, timeout=240))
    assert [r["rank"] for r in out] == list(range(PROCESSES))
    return directory, out


def test_sixteen_processes_save_twice_and_restore_bit_identical(job):
    _, out = job
    for r in out:
        assert r["bad"] == []  # every local shard equal to the saved values
        first, steady = r["saves"]
        assert (first["steady"], first["resent"]) == (False, False)
        assert (steady["steady"], steady["resent"]) == (True, False)


@pytest.mark.parametrize("processes", [3, 1])
def test_restore_on_fewer_processes_is_bit_identical(job, processes):
    directory, _ = job
    out = results(run_launch(WORKER, "restore", directory, ARRAYS, processes=processes,
                             devices_per_process=1, timeout=120))
    assert [r["bad"] for r in out] == [[]] * processes
    assert [r["checked"] for r in out] == [ARRAYS] * processes  # one shard per array


def test_a_process_failing_mid_save_is_a_clean_error_on_every_survivor(job):
    _, out = job
    for r in out:
        kind, message = r["raised"]
        assert kind == "CheckpointError"
        assert message.endswith("process 5: OSError: injected: disk full"), message


def test_a_process_hanging_mid_save_is_named_by_every_survivor(job):
    _, out = job
    named = "waiting for save manifests and outcome of"
    for r in out:
        kind, message = r["hung"]
        if r["rank"] == 0:
            assert kind == "CoordinationTimeoutError"
            assert message.startswith("Timed out after 3s " + named), message
        else:  # the coordinator's timeout reached them first, as its abort
            assert kind == "CoordinationError"
            assert message.startswith("Process 0 gave up on the job's checkpoint "
                                      "coordination"), message
        assert "from processes [7]" in message
        assert message.endswith("resume from its latest checkpoint")
        if r["rank"] != 7:
            assert r["hung_s"] < 20  # bounded: the survivors did not wait for process 7
