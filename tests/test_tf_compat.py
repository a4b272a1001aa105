"""TensorFlow compatibility, stated: CheckpointOptions' TF fields, the eager no-op status
calls, max_to_keep's TF validation, and get_savedmodel_number_from_path."""

import dataclasses

import numpy as np
import pytest

from dcheckpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    CheckpointOptions,
    InitializationOnlyStatus,
    Variable,
)


def make(value=0.0):
    return Checkpoint(w=Variable(np.full(3, value, np.float32)))


def test_experimental_enable_async_checkpoint_is_enable_async(tmp_path):
    options = CheckpointOptions(experimental_enable_async_checkpoint=True)
    assert options.enable_async is True
    checkpoint = make(2.0)
    path = checkpoint.save(tmp_path / "ckpt", options=options)
    checkpoint.sync()
    fresh = make()
    fresh.restore(path).assert_consumed()
    np.testing.assert_array_equal(np.asarray(fresh.w.value), np.full(3, 2.0, np.float32))
    assert CheckpointOptions().enable_async is False


def test_write_callbacks_run_after_the_commit_with_or_without_the_path(tmp_path):
    seen = []

    def with_path(save_path):
        # Called after the commit: the checkpoint is already restorable.
        make().restore(save_path).assert_consumed()
        seen.append(("path", save_path))

    options = CheckpointOptions(
        experimental_write_callbacks=[with_path, lambda: seen.append(("none",))])
    assert isinstance(options.experimental_write_callbacks, tuple)
    hash(options)  # still a hashable frozen value
    path = make().save(tmp_path / "ckpt", options=options)
    assert seen == [("path", path), ("none",)]
    async_options = dataclasses.replace(options, enable_async=True)
    checkpoint = make()
    path = checkpoint.save(tmp_path / "async", options=async_options)
    checkpoint.sync()
    assert seen[-2:] == [("path", path), ("none",)]


def test_a_failing_write_callback_fails_the_save_after_the_commit(tmp_path):
    def boom(path):
        raise RuntimeError("callback failed")

    checkpoint = make()
    with pytest.raises(RuntimeError, match="callback failed"):
        checkpoint.save(tmp_path / "ckpt", options=CheckpointOptions(
            experimental_write_callbacks=[boom]))
    make().restore(str(tmp_path / "ckpt-1")).assert_consumed()  # committed before
    # Committed, so it counts (a failure before the commit takes the count back).
    assert int(checkpoint.save_counter.value) == 1
    (tmp_path / "a_file").write_text("")  # no checkpoint directory can go under it
    with pytest.raises(CheckpointError):
        checkpoint.save(tmp_path / "a_file" / "ckpt")
    assert int(checkpoint.save_counter.value) == 1
    assert checkpoint.save(tmp_path / "ckpt") == str(tmp_path / "ckpt-2")


def test_experimental_io_device_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"experimental_io_device='/job:localhost' is not "
                                         r"supported: every process writes its own shards"):
        CheckpointOptions(experimental_io_device="/job:localhost")
    with pytest.raises(ValueError, match="experimental_write_callbacks must be callables"):
        CheckpointOptions(experimental_write_callbacks=["not callable"])


def test_restore_and_read_accept_options(tmp_path):
    path = make(1.0).save(tmp_path / "ckpt")
    options = CheckpointOptions(timeout_secs=1.0)
    assert make().restore(path, options=options).assert_consumed()
    assert make().read(path, options).expect_partial().assert_existing_objects_matched()


def test_status_run_restore_ops_and_initialize_or_restore_are_eager_no_ops(tmp_path):
    path = make(1.0).save(tmp_path / "ckpt")
    fresh = make()
    status = fresh.restore(path)
    assert status.run_restore_ops() is None
    assert status.initialize_or_restore(session=None) is None
    np.testing.assert_array_equal(np.asarray(fresh.w.value), np.ones(3, np.float32))
    status.assert_consumed()
    none = fresh.restore(None)
    assert isinstance(none, InitializationOnlyStatus)
    assert none.run_restore_ops() is None and none.initialize_or_restore() is None


@pytest.mark.parametrize("max_to_keep, error, message", [
    (True, TypeError, r"max_to_keep must be a positive int or None .*got True \(bool\)"),
    (2.0, TypeError, r"max_to_keep must be a positive int or None .*got 2.0 \(float\)"),
    ("3", TypeError, r"got '3' \(str\)"),
    (0, ValueError, r"max_to_keep must be positive or None \(keep all\), got 0"),
])
def test_max_to_keep_is_validated_as_tf_documents(tmp_path, max_to_keep, error, message):
    with pytest.raises(error, match=message):
        CheckpointManager(make(), tmp_path, max_to_keep=max_to_keep)
    assert not (tmp_path / "checkpoint").exists()


def test_max_to_keep_accepts_ints_numpy_ints_and_none(tmp_path):
    manager = CheckpointManager(make(), tmp_path / "a", max_to_keep=np.int64(1))
    manager.save()
    manager.save()
    assert len(manager.checkpoints) == 1
    assert CheckpointManager(make(), tmp_path / "b", max_to_keep=None).checkpoints == []
