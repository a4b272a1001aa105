"""CheckpointManager and checkpoints_iterator on real checkpoints, as TF's tests check them."""

import gc
import json
import os
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest

from dcheckpoint import _manager
from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._lock import LOCK_FILENAME
from dcheckpoint._manager import CheckpointManager, checkpoints_iterator
from dcheckpoint._options import CheckpointOptions
from dcheckpoint._state_file import STATE_FILENAME, get_checkpoint_state, latest_checkpoint
from dcheckpoint._status import CheckpointAssertionError
from dcheckpoint._variable import Variable
from dcheckpoint.errors import CorruptCheckpointError
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "manager_worker.py"


def on_disk(directory):
    return sorted(
        name for name in os.listdir(directory) if name not in (STATE_FILENAME, LOCK_FILENAME)
    )


def numbered(directory, *numbers, name="ckpt"):
    return [os.path.join(directory, f"{name}-{n}") for n in numbers]


def make_checkpoint(value=0.0):
    return Checkpoint(weights=Variable(np.full((4,), value, np.float32)))


@pytest.mark.parametrize(
    "max_to_keep, kept",
    [(1, [5]), (3, [3, 4, 5]), (None, [1, 2, 3, 4, 5])],
)
def test_retention_keeps_the_newest(tmp_path, max_to_keep, kept):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=max_to_keep)
    paths = [manager.save() for _ in range(5)]

    assert paths == numbered(tmp_path, 1, 2, 3, 4, 5)
    assert manager.checkpoints == numbered(tmp_path, *kept)
    assert manager.latest_checkpoint == str(tmp_path / "ckpt-5")
    assert on_disk(tmp_path) == sorted(f"ckpt-{n}" for n in kept)
    state = get_checkpoint_state(tmp_path)
    assert state.model_checkpoint_path == str(tmp_path / "ckpt-5")
    assert list(state.all_model_checkpoint_paths) == numbered(tmp_path, *kept)
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-5")


@pytest.mark.parametrize("max_to_keep", [0, -2])
def test_non_positive_max_to_keep_is_refused(tmp_path, max_to_keep):
    with pytest.raises(ValueError, match=f"max_to_keep must be positive or None.*{max_to_keep}"):
        CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=max_to_keep)


def test_interval_needs_a_step_counter(tmp_path):
    with pytest.raises(ValueError, match="`step_counter` should be passed"):
        CheckpointManager(make_checkpoint(), tmp_path, 3, checkpoint_interval=10)


def test_user_number_is_used_as_is_and_save_counter_still_counts(tmp_path):
    checkpoint = make_checkpoint()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=None)
    assert manager.save(checkpoint_number=100) == str(tmp_path / "ckpt-100")
    assert manager.save(checkpoint_number=Variable(np.int64(7))) == str(tmp_path / "ckpt-7")
    assert manager.save() == str(tmp_path / "ckpt-3")
    assert int(checkpoint.save_counter.value) == 3
    assert manager.checkpoints == numbered(tmp_path, 100, 7, 3)


def test_keep_checkpoint_every_n_hours_preserves_off_the_list(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(_manager, "_now", lambda: clock[0])
    manager = CheckpointManager(
        make_checkpoint(), tmp_path, max_to_keep=2, keep_checkpoint_every_n_hours=1
    )
    for n in range(1, 11):
        clock[0] = 1000.0 * n
        manager.save()
    # ckpt-4 (t=4000) is the first an hour past the start (t=-1); ckpt-8 (t=8000) is
    # the first an hour past ckpt-4. Both left the managed list but stay on disk.
    assert manager.checkpoints == numbered(tmp_path, 9, 10)
    assert on_disk(tmp_path) == ["ckpt-10", "ckpt-4", "ckpt-8", "ckpt-9"]
    assert get_checkpoint_state(tmp_path).last_preserved_timestamp == 8000.0

    clock[0] = 11000.0
    successor = CheckpointManager(
        make_checkpoint(), tmp_path, max_to_keep=2, keep_checkpoint_every_n_hours=1
    )
    assert successor.checkpoints == numbered(tmp_path, 9, 10)
    successor.restore_or_initialize()  # save_counter 10: the next is ckpt-11
    for n in (11, 12):  # 9 (9000 - 3600 < 8000) and 10 are deleted, not preserved
        clock[0] = 1000.0 * n
        successor.save()
    assert on_disk(tmp_path) == ["ckpt-11", "ckpt-12", "ckpt-4", "ckpt-8"]


def test_interval_skips_until_enough_steps(tmp_path):
    step = Variable(np.int64(0))
    manager = CheckpointManager(
        make_checkpoint(), tmp_path, None, step_counter=step, checkpoint_interval=10
    )
    assert manager.checkpoint_interval == 10
    assert manager.save() == str(tmp_path / "ckpt-1")  # step 0: first save always runs
    step.assign(5)
    assert manager.save() is None  # 5 < 0 + 10
    assert manager.save(check_interval=False) == str(tmp_path / "ckpt-2")
    assert manager.save(check_interval=False) is None  # same step twice: never
    step.assign(14)
    assert manager.save() is None  # 14 < 5 + 10
    step.assign(15)
    assert manager.save() == str(tmp_path / "ckpt-3")
    assert manager.checkpoints == numbered(tmp_path, 1, 2, 3)


def test_restore_or_initialize(tmp_path):
    calls = []
    checkpoint = make_checkpoint(1.0)
    manager = CheckpointManager(checkpoint, tmp_path, 2, init_fn=lambda: calls.append(1))
    assert manager.restore_or_initialize() is None
    assert calls == [1]
    saved = manager.save()

    restored = make_checkpoint(0.0)
    successor = CheckpointManager(restored, tmp_path, 2, init_fn=lambda: calls.append(2))
    assert successor.restore_or_initialize() == saved
    assert calls == [1]
    np.testing.assert_array_equal(np.asarray(restored.weights.value), np.ones(4, np.float32))
    assert int(restored.save_counter.value) == 1
    assert successor.save() == str(tmp_path / "ckpt-2")


def test_restore_sets_the_interval_baseline(tmp_path):
    step = Variable(np.int64(20))
    manager = CheckpointManager(make_checkpoint(), tmp_path, None, step_counter=step,
                                checkpoint_interval=10)
    manager.save()
    successor = CheckpointManager(make_checkpoint(), tmp_path, None, step_counter=step,
                                  checkpoint_interval=10)
    successor.restore_or_initialize()
    assert successor.save() is None  # step 20 was restored: nothing new to save
    step.assign(30)
    assert successor.save() == str(tmp_path / "ckpt-2")


def test_new_manager_drops_missing_checkpoints_and_cleans_temporaries(tmp_path):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=3)
    for _ in range(3):
        manager.save()
    os.remove(tmp_path / "ckpt-3" / "dcheckpoint.json")  # as if deleted half way
    os.makedirs(tmp_path / "ckpt-4.tmp-crashed" / "weights")

    successor = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=3)
    assert successor.checkpoints == numbered(tmp_path, 1, 2)
    assert successor.latest_checkpoint == str(tmp_path / "ckpt-2")
    assert "ckpt-4.tmp-crashed" not in os.listdir(tmp_path)


def test_async_saves_apply_retention_after_commit(tmp_path):
    checkpoint = make_checkpoint()
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2)
    options = CheckpointOptions(enable_async=True)
    for n in range(1, 5):
        checkpoint.weights.assign(np.full((4,), n, np.float32))
        assert manager.save(options=options) == str(tmp_path / f"ckpt-{n}")
    manager.sync()
    assert manager.checkpoints == numbered(tmp_path, 3, 4)
    assert on_disk(tmp_path) == ["ckpt-3", "ckpt-4"]
    restored = make_checkpoint()
    restored.restore(latest_checkpoint(tmp_path))
    np.testing.assert_array_equal(np.asarray(restored.weights.value), np.full(4, 4, np.float32))


def test_second_manager_in_a_new_process_continues(tmp_path):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    for _ in range(3):
        manager.save()
    del manager  # the job ends: its writer lock goes with it
    gc.collect()
    completed = subprocess.run(
        [sys.executable, str(WORKER), "continue", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    (found,) = results(completed)
    assert found["before"] == ["ckpt-2", "ckpt-3"]
    assert found["restored"] == "ckpt-3"
    assert found["after"] == ["ckpt-3", "ckpt-4"]
    assert on_disk(tmp_path) == ["ckpt-3", "ckpt-4"]


def test_a_manager_in_another_process_is_refused_while_one_is_alive(tmp_path):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    manager.save()
    completed = subprocess.run(
        [sys.executable, str(WORKER), "continue", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "CheckpointLockedError" in completed.stderr
    assert f"pid {os.getpid()}" in completed.stderr  # names the live holder
    assert on_disk(tmp_path) == ["ckpt-1"]  # the refused manager cleaned nothing
    manager.save()
    assert on_disk(tmp_path) == ["ckpt-1", "ckpt-2"]


def test_two_processes_write_the_state_and_delete_once(tmp_path):
    completed = run_launch(WORKER, "mpi", tmp_path, processes=2, devices_per_process=2)
    by_rank = results(completed)
    assert [r["rank"] for r in by_rank] == [0, 1]
    for r in by_rank:
        assert r["checkpoints"] == ["ckpt-4", "ckpt-5"]
        assert r["latest"] == "ckpt-5"
    log = completed.stdout.splitlines() + completed.stderr.splitlines()
    writes = [line for line in log if "wrote the state file" in line]
    deletes = [line for line in log if "deleted old checkpoint" in line]
    # 5 saves, 1 state write each; a save that deletes writes the state (without the
    # victim) first, so the state file never names a deleted checkpoint.
    assert len(writes) == 5 and all(line.startswith("[0]") for line in writes)
    order = ["W" if "wrote the state file" in line else "D" for line in log
             if "wrote the state file" in line or "deleted old checkpoint" in line]
    assert order == ["W", "W", "W", "D", "W", "D", "W", "D"]
    assert sorted(line.rsplit("/", 1)[-1] for line in deletes) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert all(line.startswith("[0]") for line in deletes)
    assert on_disk(tmp_path) == ["ckpt-4", "ckpt-5"]
    assert json.loads((tmp_path / STATE_FILENAME).read_text())["all_model_checkpoint_paths"] == [
        "ckpt-4", "ckpt-5"]


def test_processes_agree_on_the_managed_list_despite_clock_skew(tmp_path):
    # Rank 1's clock is behind the state file's times: deciding alone, it would drop
    # every checkpoint from its list (TF's rule for a clock that went backwards).
    by_rank = results(run_launch(WORKER, "skew", tmp_path, processes=2, devices_per_process=2))
    assert [r["checkpoints"] for r in by_rank] == [["ckpt-1", "ckpt-2", "ckpt-3"]] * 2
    assert [r["latest"] for r in by_rank] == ["ckpt-3"] * 2


def test_every_process_raises_when_the_coordinator_cannot_lock(tmp_path):
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    by_rank = results(run_launch(WORKER, "refused", tmp_path, processes=2,
                                 devices_per_process=2, timeout=90))
    assert [r["rank"] for r in by_rank] == [0, 1]
    # The same class and message on every process (the coordinator's, decided once).
    assert by_rank[0]["error"] == by_rank[1]["error"]
    assert by_rank[1]["error"].startswith(
        f"CheckpointLockedError: The coordinator could not start a CheckpointManager in "
        f"{str(tmp_path)!r}: CheckpointLockedError: "
    )
    assert f"pid {os.getpid()}" in by_rank[1]["error"]
    del manager


def test_a_manager_that_fails_to_start_releases_the_lock(tmp_path):
    (tmp_path / STATE_FILENAME).write_text("not json")
    with pytest.raises(CorruptCheckpointError) as failure:
        CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    # The traceback keeps the half-built manager alive; its lock must not outlive it.
    assert failure.value is not None
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_evaluator_thread_follows_a_writer(tmp_path):
    seen = queue.Queue()
    done = threading.Event()

    def evaluate():
        for path in checkpoints_iterator(
            tmp_path, timeout=0.2, timeout_fn=done.is_set, seconds_to_sleep=0.02
        ):
            seen.put(path)

    evaluator = threading.Thread(target=evaluate)
    evaluator.start()
    manager = CheckpointManager(make_checkpoint(), tmp_path, max_to_keep=2)
    followed = []
    for _ in range(3):
        path = manager.save()
        followed.append(seen.get(timeout=60))  # hand-shake: never skip one
        assert followed[-1] == path
    done.set()
    evaluator.join(timeout=60)
    assert not evaluator.is_alive()
    assert followed == numbered(tmp_path, 1, 2, 3)
    assert seen.empty()


def test_iterator_timeout_ends_or_asks_timeout_fn(tmp_path):
    assert list(checkpoints_iterator(tmp_path, timeout=0.05, seconds_to_sleep=0.01)) == []
    answers = iter([False, False, True])
    calls = []

    def timeout_fn():
        calls.append(1)
        return next(answers)

    found = checkpoints_iterator(tmp_path, timeout=0.05, timeout_fn=timeout_fn,
                                 seconds_to_sleep=0.01)
    assert list(found) == []
    assert len(calls) == 3


def test_a_finalizer_running_inside_lock_directory_does_not_deadlock(tmp_path, monkeypatch):
    from dcheckpoint._lock import DirectoryLock

    other, mine = str(tmp_path / "other"), str(tmp_path / "mine")
    _manager._lock_directory(other)
    real_acquire = DirectoryLock.acquire

    def acquire_while_gc_finalizes(self):
        _manager._unlock_directory(other)  # what a GC-run manager finalizer does here
        return real_acquire(self)

    monkeypatch.setattr(DirectoryLock, "acquire", acquire_while_gc_finalizes)
    worker = threading.Thread(target=_manager._lock_directory, args=(mine,), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "deadlocked on the lock registry's guard"
    assert not os.path.exists(os.path.join(other, LOCK_FILENAME))
    assert os.path.exists(os.path.join(mine, LOCK_FILENAME))
    _manager._unlock_directory(mine)


def test_strict_restore_or_initialize_refuses_a_renamed_layer(tmp_path):
    saved = {"dense": Variable(np.arange(4.0)), "head": Variable(np.ones(2))}
    CheckpointManager(Checkpoint(model=saved), tmp_path, max_to_keep=2).save()
    renamed = {"dense": Variable(np.zeros(4)), "output": Variable(np.zeros(2))}
    manager = CheckpointManager(Checkpoint(model=renamed), tmp_path, max_to_keep=2)
    with pytest.raises(CheckpointAssertionError,
                       match=r"Unused checkpoint values .*'model/head'.*Objects with no value "
                             r"in the checkpoint: \['model/output'\]"):
        manager.restore_or_initialize(strict=True)
    # TF's lenient default: the renamed layer keeps its fresh init, a warning says so.
    with pytest.warns(UserWarning, match=r"never restored: \['model/head'\]"):
        assert manager.restore_or_initialize() == str(tmp_path / "ckpt-1")
        gc.collect()
    np.testing.assert_array_equal(np.asarray(renamed["dense"].value), np.arange(4.0))
    np.testing.assert_array_equal(np.asarray(renamed["output"].value), np.zeros(2))
    exact = {"dense": Variable(np.zeros(4)), "head": Variable(np.zeros(2))}
    strict = CheckpointManager(Checkpoint(model=exact), tmp_path, max_to_keep=2)
    assert strict.restore_or_initialize(strict=True) == str(tmp_path / "ckpt-1")
    np.testing.assert_array_equal(np.asarray(exact["head"].value), np.ones(2))
