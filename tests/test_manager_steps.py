"""Steps as integers on CheckpointManager: all_steps, latest_step, restore(step), delete(step)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dcheckpoint import CheckpointManager, CheckpointNotFoundError, latest_checkpoint
from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._metadata import METADATA_FILE
from dcheckpoint._options import CheckpointOptions
from dcheckpoint._state_file import STATE_FILENAME, get_checkpoint_state
from dcheckpoint._variable import Variable
from tests.mp_util import REPO_ROOT, results, run_launch


def make(tmp_path, **kwargs):
    weights = Variable(np.zeros(4, np.float32))
    manager = CheckpointManager(Checkpoint(weights=weights), tmp_path, **kwargs)
    return manager, weights


def save_steps(manager, weights, steps, **kwargs):
    for step in steps:
        weights.assign(np.full(4, step, np.float32))
        manager.save(checkpoint_number=step, **kwargs)


def test_steps_are_the_numbers_of_the_committed_checkpoints(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=3)
    assert manager.all_steps() == [] and manager.latest_step() is None
    save_steps(manager, weights, [10, 20, 30, 40])
    os.makedirs(tmp_path / "ckpt-50")  # an interrupted save is no step
    os.makedirs(tmp_path / "other-60")  # neither is another name's directory
    assert manager.all_steps() == [20, 30, 40]
    assert manager.latest_step() == 40
    # TF's list of paths is unchanged.
    assert manager.checkpoints == [str(tmp_path / f"ckpt-{n}") for n in (20, 30, 40)]


def test_all_steps_include_checkpoints_kept_for_good(tmp_path, monkeypatch):
    clock = iter(float(t) for t in range(0, 10**6, 3600))  # one save per hour
    monkeypatch.setattr("dcheckpoint._manager._now", lambda: next(clock))
    manager, weights = make(tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=2)
    save_steps(manager, weights, [1, 2, 3, 4, 5])
    assert manager.checkpoints == [str(tmp_path / "ckpt-5")]
    # Saved at hours 1..5 (the manager started at hour 0): 2 and 4 left the managed list
    # two hours after the last preserved one and stay on disk; 1 and 3 were deleted.
    assert manager.all_steps() == [2, 4, 5]


def test_restore_a_step_brings_back_its_values(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [1, 2, 3])
    status = manager.restore(2)
    status.assert_consumed()
    np.testing.assert_array_equal(np.asarray(weights.value), np.full(4, 2, np.float32))
    manager.restore(np.int64(1))  # numpy ints are steps too
    np.testing.assert_array_equal(np.asarray(weights.value), np.full(4, 1, np.float32))


def test_restore_a_missing_step_lists_the_steps_there_are(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [5, 7])
    with pytest.raises(CheckpointNotFoundError,
                       match=r"No committed checkpoint for step 6 .*available steps: \[5, 7\]"):
        manager.restore(6)
    with pytest.raises(TypeError, match="step must be an int, got 5.0"):
        manager.restore(5.0)
    with pytest.raises(TypeError, match="step must be an int, got True"):
        manager.restore(True)


def test_delete_a_middle_step_marker_first_and_updates_the_state_file(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [1, 2, 3])
    assert manager.delete(2) == str(tmp_path / "ckpt-2")
    assert not os.path.exists(tmp_path / "ckpt-2")
    assert manager.all_steps() == [1, 3]
    state = get_checkpoint_state(tmp_path)
    assert list(state.all_model_checkpoint_paths) == [str(tmp_path / "ckpt-1"),
                                                      str(tmp_path / "ckpt-3")]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-3")
    # A new manager agrees.
    again, _ = make(tmp_path, max_to_keep=None)
    assert again.checkpoints == manager.checkpoints and again.latest_step() == 3


def test_delete_the_latest_makes_the_previous_one_latest(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [1, 2])
    manager.delete(2)
    assert manager.latest_step() == 1
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-1")
    manager.delete(1)
    assert manager.latest_step() is None and manager.checkpoints == []
    # Nothing left to record: no state file, as in a fresh directory.
    assert not os.path.exists(tmp_path / STATE_FILENAME)
    assert latest_checkpoint(tmp_path) is None
    assert manager.restore_or_initialize() is None


def test_delete_a_missing_step_changes_nothing(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [1])
    before = (tmp_path / STATE_FILENAME).read_bytes()
    with pytest.raises(CheckpointNotFoundError, match=r"step 4 .*available steps: \[1\]"):
        manager.delete(4)
    assert (tmp_path / STATE_FILENAME).read_bytes() == before
    assert (tmp_path / "ckpt-1" / METADATA_FILE).exists()


def test_delete_waits_for_an_async_save_of_that_step(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    save_steps(manager, weights, [1, 2], options=CheckpointOptions(enable_async=True))
    manager.delete(2)  # the save of 2 may still be in flight: delete must see it
    assert manager.all_steps() == [1]
    assert json.loads((tmp_path / STATE_FILENAME).read_text())[
        "all_model_checkpoint_paths"] == ["ckpt-1"]


def test_delete_and_restore_under_mpiexec(tmp_path):
    completed = run_launch(REPO_ROOT / "tests" / "workers" / "steps_worker.py", tmp_path,
                           processes=2, devices_per_process=2)
    ranks = results(completed)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["steps_before"] == [1, 2, 3]
        assert r["steps_after"] == [1, 3]
        assert r["latest_after"] == 3
        assert r["restored"] == [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
        assert r["missing_error"].startswith("CheckpointNotFoundError")
    # The lock file is gone: the job ended and released it.
    assert sorted(os.listdir(tmp_path)) == [STATE_FILENAME, "ckpt-1", "ckpt-3"]


def test_restore_a_step_of_real_flax_and_optax_state(tmp_path):
    import flax.linen as nn
    import jax
    import optax

    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    optimizer = optax.adam(1e-2)
    state = {"params": params, "opt": optimizer.init(params)}
    checkpoint = Checkpoint(state=state)
    manager = CheckpointManager(checkpoint, tmp_path, max_to_keep=2,
                                best_fn=lambda m: m["loss"], best_mode="min")
    snapshots = {}
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        grads = jax.tree.map(jnp.ones_like, checkpoint.state["params"])
        updates, opt = optimizer.update(grads, checkpoint.state["opt"])
        checkpoint.state = {"params": optax.apply_updates(checkpoint.state["params"], updates),
                            "opt": opt}
        snapshots[step] = jax.tree.map(np.asarray, checkpoint.state)
        manager.save(checkpoint_number=step, metadata={"loss": loss})
    assert manager.all_steps() == [2, 3]
    manager.restore(2).assert_consumed()
    restored = jax.tree.map(np.asarray, checkpoint.state)
    assert jax.tree.structure(restored) == jax.tree.structure(snapshots[2])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(snapshots[2]),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    assert int(np.asarray(checkpoint.state["opt"][0].count)) == 2


@pytest.mark.parametrize("bad, error, message", [
    (7.5, TypeError, r"checkpoint_number must be an int, got 7\.5 \(float\)"),
    (True, TypeError, r"checkpoint_number must be an int, got True \(bool\)"),
    ("7", TypeError, r"checkpoint_number must be an int, got '7' \(str\)"),
    (np.float32(3), TypeError, r"checkpoint_number must be an int"),
    (np.arange(2), TypeError, r"checkpoint_number must be an int"),
    (-1, ValueError, r"checkpoint_number must be >= 0, got -1"),
])
def test_a_checkpoint_number_that_is_not_a_whole_number_is_refused(tmp_path, bad, error,
                                                                  message):
    manager, weights = make(tmp_path, max_to_keep=3)
    manager.save(checkpoint_number=3)
    with pytest.raises(error, match=message):
        manager.save(checkpoint_number=bad)
    # Nothing written, nothing renumbered: the next save numbers as if it never happened.
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == [
        "checkpoint", "ckpt-3"]
    assert manager.all_steps() == [3] and manager.latest_checkpoint == str(tmp_path / "ckpt-3")
    assert int(manager.checkpoint.save_counter.value) == 1
    assert manager.save() == str(tmp_path / "ckpt-2")  # save_counter + 1


def test_a_checkpoint_number_may_be_an_integral_array_or_variable(tmp_path):
    manager, weights = make(tmp_path, max_to_keep=None)
    manager.save(checkpoint_number=np.int64(4))
    manager.save(checkpoint_number=np.asarray(5, np.int32))
    manager.save(checkpoint_number=Variable(np.asarray(6, np.int64)))
    manager.save(checkpoint_number=jnp.int32(7))
    assert manager.all_steps() == [4, 5, 6, 7] and manager.latest_step() == 7
