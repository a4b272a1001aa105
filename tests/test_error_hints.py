"""Errors for common mistakes name the thing and point to the fix."""

import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import Checkpoint, CheckpointManager, Variable
from dcheckpoint.errors import CheckpointMismatchError, CheckpointNotFoundError


def _restore_calls(directory):
    return [
        lambda: Checkpoint(v=Variable(np.zeros(2))).restore(directory),
        lambda: Checkpoint(v=Variable(np.zeros(2))).read(directory),
        lambda: dcheckpoint.restore_pytree(directory, {"v": None}),
        lambda: dcheckpoint.restore_pytree(directory),
    ]


def test_a_managers_directory_suggests_latest_checkpoint(tmp_path):
    directory = str(tmp_path / "run")
    manager = CheckpointManager(Checkpoint(v=Variable(np.arange(2.0))), directory, max_to_keep=2)
    manager.save()
    manager.save()
    latest = dcheckpoint.latest_checkpoint(directory)
    assert latest.endswith("ckpt-2")
    for call in _restore_calls(directory):
        with pytest.raises(CheckpointNotFoundError) as e:
            call()
        assert "CheckpointManager's directory" in str(e.value)
        assert f"dcheckpoint.latest_checkpoint({directory!r}) (now {latest!r})" in str(e.value)
        assert isinstance(e.value, FileNotFoundError)


def test_a_managers_directory_with_no_checkpoint_yet(tmp_path):
    directory = str(tmp_path / "run")
    manager = CheckpointManager(Checkpoint(v=Variable(np.arange(2.0))), directory, max_to_keep=1)
    manager.save()
    dcheckpoint._state_file.delete_checkpoint(manager.latest_checkpoint)
    with pytest.raises(CheckpointNotFoundError, match="names no committed checkpoint yet"):
        dcheckpoint.restore_pytree(directory)


def test_a_sharding_that_does_not_divide_the_shape_names_the_array(tmp_path):
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"layer": {"w": np.zeros((6, 4))}})
    sharding = NamedSharding(jax.make_mesh((4, 2), ("data", "model")), P("data"))
    for target in [sharding, jax.ShapeDtypeStruct((6, 4), np.float64, sharding=sharding)]:
        with pytest.raises(CheckpointMismatchError,
                           match=r"Array 'layer/w': the target sharding .*P\('data',?\).* "
                                 r"does not divide the saved shape \(6, 4\)"):
            dcheckpoint.restore_pytree(path, {"layer": {"w": target}})


@pytest.mark.parametrize("leaf, type_name", [
    (object(), "builtins.object"),
    (threading.Lock(), "_thread.lock"),
    ("text", "builtins.str"),
])
def test_an_unsupported_leaf_is_named_with_what_is_supported(tmp_path, leaf, type_name):
    with pytest.raises(ValueError, match=rf"leaf 'opt/0/state' has type {type_name}, which cannot "
                                         r"be saved; supported leaves: jax.Array, numpy"):
        dcheckpoint.save_pytree(str(tmp_path / "p"), {"opt": [{"state": leaf}]})
    assert not (tmp_path / "p").exists()
