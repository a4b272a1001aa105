"""Issue 15 (a): every process agrees on each save or nobody commits; a job that fell
out of step says so instead of hanging or mis-decoding; readers never see a mix of two
saves. Multi-process cases run real mpiexec (tests/workers/agree_worker.py)."""

import os
import threading

import numpy as np
import pytest

import dcheckpoint
from dcheckpoint import _engine
from dcheckpoint.errors import CheckpointNotFoundError
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "agree_worker.py"
RESTART = ("the job's processes are out of step, so every later checkpoint call fails: "
           "restart the job (every process) and resume from its latest checkpoint")


def test_processes_saving_different_paths_raise_the_same_error_and_commit_nothing(tmp_path):
    out = results(run_launch(WORKER, "paths", tmp_path, processes=2, devices_per_process=2,
                             timeout=120))
    assert [r["rank"] for r in out] == [0, 1]
    assert out[0]["error"] == out[1]["error"]
    assert out[0]["type"] == out[1]["type"] == "CoordinationError"
    best, ckpt2 = str(tmp_path / "best"), str(tmp_path / "ckpt-2")
    assert out[0]["error"] == (
        "The processes are not saving the same checkpoint, so nothing was written or "
        f"committed; they disagree on the checkpoint path (processes [0]: \"{best}\", "
        f"processes [1]: \"{ckpt2}\"). Every process must make the same checkpoint "
        "calls, with the same paths and trees, in the same order"
    )
    # Neither path exists, nothing is staged, the earlier checkpoint is untouched, and
    # the job is still in step: the next (matching) save commits.
    assert sorted(os.listdir(tmp_path)) == ["after", "first"]
    for r in out:
        assert r["first"] == r["after"] == [1.0] * 8
        assert r["first_unchanged"] is True


def test_processes_making_different_kinds_of_call_raise_the_same_error(tmp_path):
    out = results(run_launch(WORKER, "kinds", tmp_path, processes=2, devices_per_process=1,
                             timeout=120))
    assert out[0]["error"] == out[1]["error"]
    assert out[0]["type"] == out[1]["type"] == "CoordinationError"
    assert out[0]["error"].startswith(
        f"The processes are not making the same checkpoint call for save identity of "
        f"{str(tmp_path / 'tree')!r}: processes [0] are in 'save' (step #0 of this job); "
        "processes [1] are in 'manager start' (step #0 of this job)")
    # Nothing was written by either call, and the job is still in step.
    assert sorted(os.listdir(tmp_path)) == ["after"]
    assert [r["after"] for r in out] == [str(tmp_path / "after")] * 2


def test_processes_passing_different_metadata_raise_and_commit_nothing(tmp_path):
    # Only the coordinator's dict would be stored (and ranked by best_fn): a rank that
    # computed another loss must not pass silently.
    out = results(run_launch(WORKER, "metadata", tmp_path, processes=2,
                             devices_per_process=1, timeout=120))
    assert out[0]["error"] == out[1]["error"]
    assert out[0]["type"] == out[1]["type"] == "CoordinationError"
    assert ("they disagree on the metadata dict (save(metadata=...)) (different values "
            "for keys ['host', 'loss']: processes [0] vs [1])") in out[0]["error"]
    for r in out:  # ckpt-1 was never written; the next save, alike on both, commits
        assert r["steps"] == [2]
        _assert_listing(r, "listing", ["checkpoint", "ckpt-2"])
        assert r["stored"] == {"step": 2, "lr": 0.1, "loss": 0.5}


def test_a_save_failing_on_one_process_before_its_collectives_fails_everywhere(tmp_path):
    # An unsupported leaf, then metadata JSON cannot hold (write, save, a manager's
    # save, an exporter's), on rank 1 only: rank 1 gets its own error, rank 0 (already in the save)
    # the same failure at once instead of a 600 s wait and a job out of step; nothing
    # is written, the counters stay alike and the next save commits.
    out = results(run_launch(WORKER, "failed_here", tmp_path, processes=2,
                             devices_per_process=1, timeout=120))
    for call in ("pytree", "written", "saved", "managed"):
        kind, message = out[1][call]
        assert kind in ("ValueError", "CheckpointMismatchError"), (call, message)
        assert out[0][call] == ["CheckpointError", f"Cannot save: process 1: {kind}: {message}"]
    assert "'x'" in out[1]["pytree"][1] and "seen" in out[1]["written"][1]
    for r in out:
        assert r["counter"] == 0  # the refused save() did not move save_counter
        assert r["after"] == str(tmp_path / "after")
        # The manager's refused save took its number back on both ranks: the next is 1.
        assert r["resumed"] == str(tmp_path / "run" / "ckpt-1") and r["steps"] == [1]
        _assert_listing(r, "listing", ["after", "export", "run"])
    # The exporter refuses before its export: the others fail in the export's first step.
    kind, message = out[1]["exported"]
    assert kind == "ValueError" and "seen" in message
    assert out[0]["exported"] == [
        "CheckpointError",
        f"Exporting {str(tmp_path / 'export' / 'savedmodel-1')!r} failed: process 1: "
        f"ValueError: {message}"]
    for r in out:  # nothing exported or saved by the refused call; the next is number 1
        assert r["exported_after"] == str(tmp_path / "export" / "ckpt-1")
        _assert_listing(r, "export_listing", ["checkpoint", "ckpt-1", "savedmodel-1"])


def _assert_listing(result: dict, key: str, expected: list) -> None:
    """A directory listing as a rank saw it. The coordinator (rank 0) has written the
    state file ``checkpoint`` before its save returns; another rank may list before
    that, or while it is being replaced (``checkpoint.tmp-<id>``, renamed into place),
    so rank 1's listing is compared without the state file."""
    names = result[key]
    if result["rank"] != 0:
        names = [n for n in names if not n.startswith("checkpoint")]
        expected = [n for n in expected if n != "checkpoint"]
    assert names == expected, (result["rank"], key)


def test_an_old_reader_of_an_overwritten_checkpoint_gets_a_clear_error(tmp_path):
    path = str(tmp_path / "ckpt-5")
    dcheckpoint.save_pytree(path, {"w": np.full(4, 1, np.int32)})
    old = dcheckpoint.read_metadata(path)
    dcheckpoint.save_pytree(path, {"w": np.full(4, 2, np.int32)})
    with pytest.raises(CheckpointNotFoundError, match=(
            f"Checkpoint {path!r} was replaced by another save while it was being read")):
        _engine.restore_arrays(path, {"w": None}, metadata=old)
    assert dcheckpoint.restore_pytree(path, {"w": None})["w"].tolist() == [2] * 4


@pytest.mark.parametrize(("kind", "alone", "when"), [
    ("mpi", 0, "first"), ("mpi", 1, "first"), ("jax", 0, "first"), ("jax", 1, "first"),
    ("mpi", 0, "later"), ("jax", 1, "later"),
])
def test_a_save_made_by_one_process_times_out_and_the_next_says_restart(
        tmp_path, kind, alone, when):
    # A save made by one process only (the job's very first checkpoint call, or one
    # after a matched save): bounded by timeout_secs (2 s), then every process's next
    # save fails at once, clearly, instead of pairing with the stale messages.
    out = results(run_launch(WORKER, "alone", tmp_path, alone, kind, when, processes=2,
                             devices_per_process=1, timeout=120))
    assert [r["rank"] for r in out] == [0, 1]
    lone = out[alone]
    assert lone["alone_type"] == "CoordinationTimeoutError"
    # A lone non-coordinator waits twice the timeout for the coordinator's reply (so a
    # coordinator's timeout naming a hung peer reaches everyone first): 4 s.
    waited = 2 if alone == 0 else 4
    assert lone["alone_error"].startswith(f"Timed out after {waited}s waiting for ")
    assert lone["alone_error"].endswith(RESTART)
    for r in out:
        assert r["user_mpi"] == 1  # the user's COMM_WORLD still works
        assert r["next_type"] == "CoordinationError", r
        assert r["next_error"].endswith(RESTART)
        assert "JSONDecodeError" not in r["next_error"]
        assert r["later_type"] == "CoordinationError"
    # Nothing of the lone save or the later ones committed, nothing staged.
    assert sorted(os.listdir(tmp_path)) == (["warm"] if when == "later" else [])


def test_a_reader_racing_overwrites_of_one_checkpoint_never_sees_a_mix(tmp_path):
    # A writer re-saves ckpt-5 again and again (arrays filled with the save's
    # generation) while a reader restores it in a loop: each restore gives one
    # generation throughout, or says the checkpoint was replaced or deleted under it.
    path = str(tmp_path / "ckpt-5")
    arrays, saves = 30, 40

    def tree(generation):
        return {f"a{i:02d}": np.full(256, generation, np.float32) for i in range(arrays)}

    dcheckpoint.save_pytree(path, tree(0))
    done = threading.Event()
    failure = []

    def write():
        try:
            for generation in range(1, saves + 1):
                dcheckpoint.save_pytree(path, tree(generation))
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            failure.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    restored = mixes = replaced = 0
    target = {f"a{i:02d}": None for i in range(arrays)}
    while not done.is_set() or restored == 0:
        try:
            out = dcheckpoint.restore_pytree(path, target)
        except CheckpointNotFoundError as error:
            assert "while it was being read" in str(error) or "No committed" in str(error)
            replaced += 1
            continue
        generations = {float(v[0]) for v in out.values()} | {
            float(x) for v in out.values() for x in (v.min(), v.max())}
        restored += 1
        mixes += len(generations) > 1
    writer.join()
    assert not failure, failure
    assert mixes == 0, f"{mixes} of {restored} restores mixed two saves"
    assert restored > 0
    final = dcheckpoint.restore_pytree(path, target)
    assert all(np.all(v == saves) for v in final.values())
    # One data directory: each overwrite swapped the old one out and removed it.
    assert len([n for n in os.listdir(path) if n.startswith("data-")]) == 1
