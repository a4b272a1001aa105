"""Keep the best: CheckpointManager(best_fn=..., best_mode=...) retention, across restarts."""

import logging
import os

import numpy as np
import pytest

from dcheckpoint import CheckpointManager, read_metadata
from dcheckpoint._best import to_drop
from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._state_file import get_checkpoint_state
from dcheckpoint._variable import Variable


def loss(metadata):
    return metadata["loss"]


def make(directory, **kwargs):
    return CheckpointManager(Checkpoint(w=Variable(np.zeros(2, np.float32))), directory,
                             **kwargs)


def steps_on_disk(directory):
    return sorted(int(n.split("-")[1]) for n in os.listdir(directory) if n.startswith("ckpt-"))


def save_losses(manager, losses, first_step=1):
    for step, value in enumerate(losses, start=first_step):
        manager.save(checkpoint_number=step, metadata={"loss": value})


@pytest.mark.parametrize("paths, metrics, keep, mode, dropped", [
    # keep 2 lowest of a..d; d (latest) is the worst but stays: 3 kept.
    ("abcd", {"a": 1, "b": 3, "c": 2, "d": 9}, 2, "min", ["b"]),
    ("abcd", {"a": 1, "b": 3, "c": 2, "d": 9}, 2, "max", ["a", "c"]),
    # The latest is among the best: exactly `keep` remain.
    ("abc", {"a": 1, "b": 3, "c": 0}, 2, "min", ["b"]),
    # Unreadable (None) and NaN rank worst; ties go to the newer checkpoint.
    ("abcd", {"a": None, "b": float("nan"), "c": 5, "d": 5}, 2, "min", ["a", "b"]),
    ("abcd", {"a": 5, "b": 5, "c": 5, "d": 5}, 2, "max", ["a", "b"]),
    ("a", {"a": 1}, 1, "min", []),
])
def test_which_paths_are_dropped(paths, metrics, keep, mode, dropped):
    assert to_drop(list(paths), metrics, keep, mode) == dropped


def test_keeps_the_lowest_losses_plus_the_latest(tmp_path):
    manager = make(tmp_path, max_to_keep=2, best_fn=loss, best_mode="min")
    save_losses(manager, [5.0, 1.0, 3.0, 0.5, 4.0])
    # Best two: 4 (0.5) and 2 (1.0); 5 is the latest.
    assert steps_on_disk(tmp_path) == [2, 4, 5]
    assert manager.checkpoints == [str(tmp_path / f"ckpt-{n}") for n in (2, 4, 5)]
    assert manager.latest_step() == 5
    save_losses(manager, [0.7], first_step=6)  # 6 is now among the best: 5 goes
    assert steps_on_disk(tmp_path) == [4, 6]


def test_max_mode_keeps_the_highest(tmp_path):
    manager = make(tmp_path, max_to_keep=1, best_fn=lambda m: m["acc"], best_mode="max")
    for step, acc in enumerate([0.1, 0.9, 0.5, 0.95], start=1):
        manager.save(checkpoint_number=step, metadata={"acc": acc})
    assert steps_on_disk(tmp_path) == [4]


def test_retention_across_a_restart_reads_the_metric_from_each_checkpoint(tmp_path):
    first = make(tmp_path, max_to_keep=2, best_fn=loss, best_mode="min")
    save_losses(first, [3.0, 1.0, 2.0, 9.0])
    assert steps_on_disk(tmp_path) == [2, 3, 4]
    del first
    # A new manager (a restarted job) has no metric in memory: it reads them back from
    # the checkpoints' metadata, so step 4 (9.0) goes and 2 and 3 stay.
    second = make(tmp_path, max_to_keep=2, best_fn=loss, best_mode="min")
    assert second.checkpoints == [str(tmp_path / f"ckpt-{n}") for n in (2, 3, 4)]
    save_losses(second, [2.5], first_step=5)
    assert steps_on_disk(tmp_path) == [2, 3, 5]
    assert read_metadata(str(tmp_path / "ckpt-5")).user_metadata == {"step": 5, "loss": 2.5}
    state = get_checkpoint_state(tmp_path)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "ckpt-2", "ckpt-3", "ckpt-5"]


def test_checkpoints_without_the_metric_rank_worst_with_a_warning(tmp_path, caplog):
    plain = make(tmp_path, max_to_keep=3)
    plain.save(checkpoint_number=1)  # saved before best_fn was used: no "loss"
    del plain
    manager = make(tmp_path, max_to_keep=1, best_fn=loss, best_mode="min")
    with caplog.at_level(logging.WARNING, logger="dcheckpoint"):
        save_losses(manager, [4.0, 5.0], first_step=2)
    assert steps_on_disk(tmp_path) == [2, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("best_fn could not rank" in m and "ckpt-1" in m and "KeyError" in m
               for m in warnings), warnings


def test_a_best_fn_that_returns_no_number_stops_the_save(tmp_path):
    manager = make(tmp_path, max_to_keep=2, best_fn=lambda m: m.get("loss"))
    manager.save(checkpoint_number=1, metadata={"loss": 1.0})
    with pytest.raises(ValueError, match=r"best_fn must return a real number .*got None"):
        manager.save(checkpoint_number=2)
    with pytest.raises(ValueError, match=r"best_fn must return a real number .*got True"):
        manager.save(checkpoint_number=3, metadata={"loss": True})
    assert steps_on_disk(tmp_path) == [1]
    assert int(manager.checkpoint.save_counter.value) == 1  # refused before it moved
    manager.save(checkpoint_number=4, metadata={"loss": np.float32(0.5)})  # numpy is fine
    assert steps_on_disk(tmp_path) == [1, 4]


def test_bad_best_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="best_mode must be one of \\('max', 'min'\\), got 'best'"):
        make(tmp_path, max_to_keep=2, best_fn=loss, best_mode="best")
    with pytest.raises(ValueError, match="best_fn must be a function .* got str"):
        make(tmp_path, max_to_keep=2, best_fn="loss")


def test_composes_with_keep_checkpoint_every_n_hours(tmp_path, monkeypatch):
    clock = iter(float(t) for t in range(0, 10**6, 3600))  # one save per hour
    monkeypatch.setattr("dcheckpoint._manager._now", lambda: next(clock))
    manager = make(tmp_path, max_to_keep=1, best_fn=loss, best_mode="min",
                   keep_checkpoint_every_n_hours=2)
    save_losses(manager, [1.0, 5.0, 6.0, 7.0, 8.0])
    # 1 is the best and stays managed; the worse ones are dropped, but one of them per
    # two hours is preserved on disk (saved at hours 2 and 4: steps 2 and 4).
    assert manager.checkpoints == [str(tmp_path / "ckpt-1"), str(tmp_path / "ckpt-5")]
    assert steps_on_disk(tmp_path) == [1, 2, 4, 5]


def test_exporting_manager_keeps_the_artifacts_of_the_best(tmp_path):
    import jax

    from dcheckpoint import ExportingCheckpointManager

    manager = ExportingCheckpointManager(
        Checkpoint(w=Variable(np.ones(2, np.float32))), tmp_path, max_to_keep=1,
        serving_fn=lambda p, x: p["w"] * x, params_fn=lambda: {"w": np.ones(2, np.float32)},
        input_specs=[jax.ShapeDtypeStruct((2,), np.float32)], best_fn=loss, best_mode="min")
    save_losses(manager, [2.0, 1.0, 3.0])
    assert steps_on_disk(tmp_path) == [2, 3]
    assert [os.path.basename(p) for p in manager.get_existing_savedmodels()] == [
        "savedmodel-2", "savedmodel-3"]
    assert read_metadata(str(tmp_path / "ckpt-2")).user_metadata == {"loss": 1.0, "step": 2}
    with pytest.raises(ValueError, match=r"metadata\['loss'\]: nan"):
        manager.save(checkpoint_number=4, metadata={"loss": float("nan")})
    assert "savedmodel-4" not in os.listdir(tmp_path)  # refused before the export
    with pytest.raises(ValueError, match=r"best_fn must return a real number"):
        manager.save(checkpoint_number=5, metadata={"loss": "low"})
    assert "savedmodel-5" not in os.listdir(tmp_path)
