"""Opt-in dtype casts on restore: off by default (a clear error that names the switch),
on with cast_dtypes=True in both APIs, onto the target's own sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import Checkpoint, CheckpointMismatchError, Variable

MESH = jax.make_mesh((4, 2), ("x", "y"))
SAVED = (np.arange(64, dtype=np.float32).reshape(8, 8) / 3).astype(jnp.bfloat16)


@pytest.fixture
def bf16_checkpoint(tmp_path):
    w = jax.device_put(SAVED, NamedSharding(MESH, P("x", "y")))
    return dcheckpoint.save_pytree(str(tmp_path / "bf16"),
                                   {"w": w, "n": np.arange(3, dtype=np.int32)})


def test_a_dtype_difference_is_an_error_that_names_the_switch(bf16_checkpoint):
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32), "n": np.zeros(3, np.int32)}
    with pytest.raises(CheckpointMismatchError,
                       match=r"'w': restore target has dtype float32, the checkpoint holds "
                             r"bfloat16 \(cast_dtypes=True casts on restore\)"):
        dcheckpoint.restore_pytree(bf16_checkpoint, target)


def test_restore_pytree_casts_onto_the_targets_sharding(bf16_checkpoint):
    sharding = NamedSharding(MESH, P(None, "x"))
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding),
              "n": np.zeros(3, np.float64)}
    restored = dcheckpoint.restore_pytree(bf16_checkpoint, target, cast_dtypes=True)
    assert restored["w"].dtype == jnp.float32 and restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), SAVED.astype(np.float32))
    assert isinstance(restored["n"], np.ndarray) and restored["n"].dtype == np.float64
    np.testing.assert_array_equal(restored["n"], [0.0, 1.0, 2.0])
    # A jax.Array target keeps its placement; a narrowing cast is the user's to ask for.
    array = jax.device_put(jnp.zeros((8, 8), jnp.float16), NamedSharding(MESH, P("y")))
    narrowed = dcheckpoint.restore_pytree(bf16_checkpoint, {"w": array, "n": None},
                                          cast_dtypes=True)
    assert narrowed["w"].dtype == jnp.float16
    assert narrowed["w"].sharding.is_equivalent_to(array.sharding, 2)
    np.testing.assert_array_equal(np.asarray(narrowed["w"]), SAVED.astype(np.float16))


def test_a_cast_never_changes_a_shape_and_never_makes_keys(bf16_checkpoint, tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r"'w': restore target has shape \(4, 16\)"):
        dcheckpoint.restore_pytree(bf16_checkpoint, {"w": jax.ShapeDtypeStruct(
            (4, 16), jnp.float32), "n": None}, cast_dtypes=True)
    keys = dcheckpoint.save_pytree(str(tmp_path / "keys"), {"k": jax.random.key(0)})
    with pytest.raises(CheckpointMismatchError, match=r"'k'"):
        dcheckpoint.restore_pytree(keys, {"k": np.zeros(2, np.float32)}, cast_dtypes=True)


def test_the_object_api_casts_with_the_same_switch(bf16_checkpoint, tmp_path):
    path = Checkpoint(m={"w": Variable(jax.device_put(
        SAVED, NamedSharding(MESH, P("x", "y"))))}).save(str(tmp_path / "obj"))
    sharding = NamedSharding(MESH, P(None, "x"))
    model = {"w": Variable(jax.device_put(jnp.zeros((8, 8)), sharding))}
    with pytest.raises(CheckpointMismatchError, match=r"cast_dtypes=True casts on restore"):
        Checkpoint(m=model).restore(path)
    np.testing.assert_array_equal(np.asarray(model["w"].value), np.zeros((8, 8)))  # untouched
    Checkpoint(m=model).restore(path, cast_dtypes=True).assert_consumed()
    assert model["w"].value.dtype == jnp.float32 and model["w"].value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(model["w"].value), SAVED.astype(np.float32))


def test_pytree_manager_restore_casts(tmp_path):
    with dcheckpoint.PytreeManager(tmp_path / "run") as manager:
        manager.save(3, {"w": jnp.asarray(SAVED)})
        restored = manager.restore(target={"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)},
                                   cast_dtypes=True)
    np.testing.assert_array_equal(np.asarray(restored["w"]), SAVED.astype(np.float32))
