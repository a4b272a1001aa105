"""Async saves: the snapshot is taken before save() returns, errors are never lost,
consecutive saves keep their order, and it all holds under mpiexec."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from tests.mp_util import REPO_ROOT, results, run_launch

ASYNC = dcheckpoint.CheckpointOptions(enable_async=True)


def _sharded(values):
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return jax.device_put(values, NamedSharding(mesh, P("x", "y")))


def _restored(path, like):
    target = dcheckpoint.Variable(jnp.zeros_like(like))
    dcheckpoint.Checkpoint(v=target).restore(path).assert_consumed()
    return np.asarray(target.value)


def test_mutating_and_deleting_arrays_after_save_returns_does_not_change_the_save(tmp_path):
    original = np.arange(64, dtype=np.float32).reshape(8, 8)
    array = _sharded(original)
    variable = dcheckpoint.Variable(array)
    ckpt = dcheckpoint.Checkpoint(v=variable)
    path = ckpt.save(str(tmp_path / "ckpt"), options=ASYNC)
    variable.assign(jnp.full((8, 8), -1.0))  # the training step moves on...
    array.delete()  # ...and frees the buffers the save was taken from
    ckpt.sync()
    assert path == str(tmp_path / "ckpt-1")
    np.testing.assert_array_equal(_restored(path, original), original)


def test_consecutive_async_saves_commit_in_order_with_their_own_values(tmp_path):
    variable = dcheckpoint.Variable(_sharded(np.zeros((8, 8), np.float32)))
    ckpt = dcheckpoint.Checkpoint(v=variable)
    paths = []
    for step in range(1, 5):
        variable.assign(_sharded(np.full((8, 8), step, np.float32)))
        paths.append(ckpt.save(str(tmp_path / "ckpt"), options=ASYNC))
    ckpt.sync()
    assert paths == [str(tmp_path / f"ckpt-{n}") for n in range(1, 5)]
    for step, path in enumerate(paths, start=1):
        assert np.all(_restored(path, np.zeros((8, 8), np.float32)) == step)
        assert dcheckpoint.read_metadata(path).save_time > 0


def test_background_failure_is_raised_by_sync(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(jnp.ones(4)))
    ckpt.write(str(tmp_path / "file" / "ckpt"), options=ASYNC)  # returns before failing
    with pytest.raises(dcheckpoint.CheckpointError, match="file/ckpt"):
        ckpt.sync()
    ckpt.sync()  # reported once, then cleared


def test_background_failure_is_raised_by_the_next_save(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(jnp.ones(4)))
    ckpt.write(str(tmp_path / "file" / "ckpt"), options=ASYNC)
    with pytest.raises(dcheckpoint.CheckpointError, match="file/ckpt"):
        ckpt.write(str(tmp_path / "good"), options=ASYNC)


def _run_script(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_interpreter_exit_waits_for_an_unfinished_save(tmp_path):
    done = _run_script(f"""
        import numpy as np, jax.numpy as jnp, dcheckpoint
        ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(jnp.arange(1000.0)))
        ckpt.write({str(tmp_path / 'ckpt')!r},
                   options=dcheckpoint.CheckpointOptions(enable_async=True))
        # exits without sync()
    """)
    assert done.returncode == 0, done.stderr
    meta = dcheckpoint.read_metadata(str(tmp_path / "ckpt"))
    assert meta.arrays["v"].shape == (1000,)


def test_interpreter_exit_reports_a_failure_nobody_collected(tmp_path):
    (tmp_path / "file").write_text("x")
    done = _run_script(f"""
        import jax.numpy as jnp, dcheckpoint
        ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(jnp.ones(3)))
        ckpt.write({str(tmp_path / 'file' / 'ckpt')!r},
                   options=dcheckpoint.CheckpointOptions(enable_async=True))
    """)
    assert "an asynchronous save failed and nobody called sync()" in done.stderr
    assert "file/ckpt" in done.stderr


def test_async_saves_under_mpiexec(tmp_path):
    worker = REPO_ROOT / "tests" / "workers" / "async_worker.py"
    out = results(run_launch(worker, str(tmp_path / "ckpt"), processes=2,
                             devices_per_process=4))
    assert [r["restored"] for r in out] == [[1.0, 2.0, 3.0]] * 2
    assert [r["paths"][-1] for r in out] == [str(tmp_path / "ckpt-3")] * 2


def test_donating_arrays_after_save_returns_does_not_change_the_save(tmp_path):
    original = np.arange(64, dtype=np.float32).reshape(8, 8)
    variable = dcheckpoint.Variable(_sharded(original))
    ckpt = dcheckpoint.Checkpoint(v=variable)
    step = jax.jit(lambda x: x * 0 - 5.0, donate_argnums=0)
    path = ckpt.save(str(tmp_path / "ckpt"), options=ASYNC)
    variable.assign(step(variable.value))  # a training step that donates its input
    ckpt.sync()
    assert np.all(np.asarray(variable.value) == -5.0)
    np.testing.assert_array_equal(_restored(path, original), original)


def test_numpy_values_mutated_in_place_after_save_returns_do_not_change_the_save(tmp_path):
    values = np.arange(16, dtype=np.int32)
    ckpt = dcheckpoint.Checkpoint(table=values)
    path = ckpt.save(str(tmp_path / "ckpt"), options=ASYNC)
    values[:] = -1
    ckpt.sync()
    restored = dcheckpoint.restore_pytree(path, {"table": None})["table"]
    np.testing.assert_array_equal(restored, np.arange(16, dtype=np.int32))


def _hold_the_save_queue():
    """Blocks the collectives thread until the returned event is set: a save issued
    now is certainly still in flight when the test reads it."""
    import threading

    from dcheckpoint._comm import submit
    release = threading.Event()
    submit(release.wait)
    threading.Timer(0.5, release.set).start()
    return release


def test_a_read_of_a_checkpoint_this_process_is_still_saving_waits_for_it(tmp_path):
    array = _sharded(np.arange(64, dtype=np.float32).reshape(8, 8))
    ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(array))
    release = _hold_the_save_queue()
    path = ckpt.write(str(tmp_path / "run" / "ckpt"), options=ASYNC)
    assert not release.is_set()  # the save has not even started
    restored = dcheckpoint.restore_pytree(path)  # another object's read: waits for it
    np.testing.assert_array_equal(restored["v"], np.asarray(array))
    manager = dcheckpoint.CheckpointManager(ckpt, tmp_path / "managed", max_to_keep=2)
    release = _hold_the_save_queue()
    path = manager.save(options=ASYNC)
    assert dcheckpoint.read_metadata(path).arrays["v"].shape == (8, 8)
    assert release.is_set()


def test_a_read_of_a_failed_async_save_says_so(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    ckpt = dcheckpoint.Checkpoint(v=dcheckpoint.Variable(jnp.ones(4)))
    path = ckpt.write(str(tmp_path / "file" / "ckpt"), options=ASYNC)
    with pytest.raises(dcheckpoint.CheckpointNotFoundError,
                       match=r"asynchronous save of it failed .*sync\(\) raises it"):
        dcheckpoint.read_metadata(path)
    with pytest.raises(dcheckpoint.CheckpointError, match="file/ckpt"):
        ckpt.sync()  # still the saver's to raise
