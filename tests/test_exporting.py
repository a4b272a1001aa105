"""ExportingCheckpointManager: artifacts beside checkpoints, their retention, the loader."""

import gc
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcheckpoint._checkpoint import Checkpoint
from dcheckpoint._exporting import ExportingCheckpointManager, load_savedmodel
from dcheckpoint._variable import Variable
from dcheckpoint.errors import CheckpointNotFoundError, CorruptCheckpointError
from tests.mp_util import REPO_ROOT, results, run_launch

WORKER = REPO_ROOT / "tests" / "workers" / "manager_worker.py"
INPUT_SPEC = jax.ShapeDtypeStruct((3, 4), jnp.float32)


def serving_fn(params, x):
    return jnp.tanh(x @ params["w"] + params["b"][0])


def make_model(tmp_path, max_to_keep=2, **kwargs):
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    w = Variable(jax.device_put(np.arange(32, dtype=np.float32).reshape(4, 8) / 32, sharded))
    b = Variable(np.full((8,), 0.5, np.float32))
    checkpoint = Checkpoint(w=w, b=b)
    manager = ExportingCheckpointManager(
        checkpoint,
        tmp_path,
        max_to_keep,
        serving_fn=serving_fn,
        params_fn=lambda: {"w": w.value, "b": [b.value]},
        input_specs=[INPUT_SPEC],
        **kwargs,
    )
    return manager, w, b


def names(paths):
    return [os.path.basename(p) for p in paths]


def test_artifacts_follow_the_checkpoints_retention(tmp_path):
    manager, w, _ = make_model(tmp_path, max_to_keep=2)
    for n in range(1, 4):
        w.assign(w.value + 1.0)
        assert manager.save() == str(tmp_path / f"ckpt-{n}")

    assert names(manager.checkpoints) == ["ckpt-2", "ckpt-3"]
    assert names(manager.savedmodels) == ["savedmodel-2", "savedmodel-3"]
    assert names(manager.get_existing_savedmodels()) == ["savedmodel-2", "savedmodel-3"]
    assert manager.latest_savedmodel == str(tmp_path / "savedmodel-3")
    assert sorted(os.listdir(tmp_path)) == [
        ".dcheckpoint.lock", "checkpoint", "ckpt-2", "ckpt-3", "savedmodel-2", "savedmodel-3"]
    manifest = json.loads((tmp_path / "savedmodel-3" / "manifest.json").read_text())
    assert manifest["number"] == 3 and manifest["param_count"] == 2


def test_savedmodel_number_from_path(tmp_path):
    manager, _, _ = make_model(tmp_path)
    assert manager.get_savedmodel_number_from_path(tmp_path / "savedmodel-12") == 12
    assert manager.get_savedmodel_number_from_path("savedmodel-7/") == 7
    # TF returns None for a path that names no artifact; callers filter listings with it.
    assert manager.get_savedmodel_number_from_path(tmp_path / "ckpt-12") is None
    assert manager.get_savedmodel_number_from_path(tmp_path / "savedmodel-x") is None


def test_loaded_in_a_fresh_process_gives_the_same_outputs(tmp_path):
    manager, w, b = make_model(tmp_path)
    manager.save()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    expected = np.asarray(serving_fn({"w": w.value, "b": [b.value]}, x))
    np.save(tmp_path / "inputs.npy", x)

    completed = subprocess.run(
        [sys.executable, str(WORKER), "load", str(manager.latest_savedmodel),
         str(tmp_path / "inputs.npy")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    (found,) = results(completed)
    assert found["dtype"] == "float32"
    np.testing.assert_allclose(np.array(found["outputs"], np.float32), expected, rtol=1e-6)


def test_loader_restores_params_in_their_structure(tmp_path):
    manager, w, b = make_model(tmp_path)
    manager.save()
    loaded = load_savedmodel(manager.latest_savedmodel)
    assert sorted(loaded.params) == ["b", "w"]
    np.testing.assert_array_equal(np.asarray(loaded.params["w"]), np.asarray(w.value))
    np.testing.assert_array_equal(np.asarray(loaded.params["b"][0]), np.asarray(b.value))
    with pytest.raises(ValueError):  # the exported shape is fixed: (3, 4)
        loaded(np.zeros((2, 4), np.float32))


def test_wait_and_iterate_over_savedmodels(tmp_path):
    manager, _, _ = make_model(tmp_path)
    assert manager.latest_savedmodel is None
    assert manager.wait_for_new_savedmodel(None, seconds_to_sleep=0.01, timeout=0.05) is None
    manager.save()
    first = manager.wait_for_new_savedmodel(None, seconds_to_sleep=0.01, timeout=0.05)
    assert first == str(tmp_path / "savedmodel-1")
    assert manager.wait_for_new_savedmodel(first, seconds_to_sleep=0.01, timeout=0.05) is None
    manager.save()
    found = list(manager.savedmodels_iterator(timeout=0.05, seconds_to_sleep=0.01))
    assert found == [str(tmp_path / "savedmodel-2")]


def test_unfinished_exports_are_removed_at_start(tmp_path):
    manager, _, _ = make_model(tmp_path)
    manager.save()
    os.remove(tmp_path / "savedmodel-1" / "manifest.json")  # as if it crashed before commit
    successor, _, _ = make_model(tmp_path)
    assert successor.get_existing_savedmodels() == []
    assert not os.path.exists(tmp_path / "savedmodel-1")
    assert names(successor.checkpoints) == ["ckpt-1"]


def test_names_must_differ(tmp_path):
    with pytest.raises(ValueError, match="must differ, both are 'ckpt'"):
        make_model(tmp_path, savedmodel_name="ckpt")


def test_object_store_locations_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="local or shared filesystem only.*s3://bucket/run"):
        make_model("s3://bucket/run")
    assert not os.path.exists("s3:")


def test_loader_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="No exported artifact"):
        load_savedmodel(tmp_path / "savedmodel-9")
    manager, _, _ = make_model(tmp_path)
    manager.save()
    (tmp_path / "savedmodel-1" / "serving_fn.jax_export").write_bytes(b"not flatbuffers")
    with pytest.raises(CorruptCheckpointError, match="is not a jax.export serialization"):
        load_savedmodel(tmp_path / "savedmodel-1")
    (tmp_path / "savedmodel-1" / "manifest.json").write_text('{"format": "pickle"}')
    with pytest.raises(CorruptCheckpointError, match="manifest.json' is malformed"):
        load_savedmodel(tmp_path / "savedmodel-1")


def test_an_export_never_outlives_a_failed_checkpoint(tmp_path):
    manager, w, _ = make_model(tmp_path, max_to_keep=3)
    assert manager.save() == str(tmp_path / "ckpt-1")
    manager.checkpoint.bad = np.array(["text"])  # the next checkpoint cannot be saved
    with pytest.raises(ValueError, match="'bad'.*dtype"):
        manager.save()
    assert names(manager.get_existing_savedmodels()) == ["savedmodel-1"]
    del manager.checkpoint.bad


def test_exports_whose_checkpoint_never_committed_are_removed_at_start(tmp_path):
    manager, _, _ = make_model(tmp_path, max_to_keep=3)
    manager.save()
    # What an async save that failed after its export leaves: artifact 7, no ckpt-7.
    shutil.copytree(tmp_path / "savedmodel-1", tmp_path / "savedmodel-7")
    del manager
    gc.collect()
    manager, _, _ = make_model(tmp_path, max_to_keep=3)
    assert names(manager.get_existing_savedmodels()) == ["savedmodel-1"]
    assert manager.latest_savedmodel == str(tmp_path / "savedmodel-1")


def test_exporting_manager_under_mpiexec_and_the_artifact_in_a_fresh_process(tmp_path):
    by_rank = results(run_launch(WORKER, "export", tmp_path, processes=2,
                                 devices_per_process=4))
    for r in by_rank:  # both processes agree on what is managed
        assert r["checkpoints"] == ["ckpt-2", "ckpt-3"]
        assert r["savedmodels"] == ["savedmodel-2", "savedmodel-3"]
        assert r["latest"] == "savedmodel-3"
    assert by_rank[0]["on_disk"] == [
        "checkpoint", "ckpt-2", "ckpt-3", "savedmodel-2", "savedmodel-3"]
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", x)
    completed = subprocess.run(
        [sys.executable, str(WORKER), "load", str(tmp_path / "savedmodel-3"),
         str(tmp_path / "inputs.npy")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    (found,) = results(completed)
    w = np.arange(32, dtype=np.float32).reshape(4, 8) / 32 + 3.0  # after three saves
    # float32 matmul in another order than numpy's: close, not bit-equal.
    np.testing.assert_allclose(np.array(found["outputs"], np.float32), np.tanh(x @ w),
                               rtol=1e-5, atol=1e-6)
