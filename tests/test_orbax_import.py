"""Checkpoints written by orbax-checkpoint, read through TensorStore onto any mesh.

The fixtures are written here by orbax itself, with its defaults (StandardCheckpointer:
OCDBT) and without OCDBT, in Zarr v2 (its default) and v3; each is read back without a
target, onto another mesh, onto one device and from abstract targets, bit for bit, and
migrated by saving it with dcheckpoint. Crafted metadata is refused.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint._cli import main
from dcheckpoint.errors import CheckpointMismatchError, CorruptCheckpointError

MESH = jax.make_mesh((4, 2), ("x", "y"))


def _tree():
    w = np.arange(64, dtype=np.float32).reshape(8, 8) / 7
    return {
        "params": {"dense": {"kernel": jax.device_put(w, NamedSharding(MESH, P("x", "y"))),
                             "bias": jnp.arange(8, dtype=jnp.bfloat16)}},
        "opt": [jnp.full((8,), 0.5), jax.device_put(jnp.arange(16, dtype=jnp.int32),
                                                    NamedSharding(MESH, P("x")))],
        "step": jnp.int32(7),
        "count": 3,
    }


def _write(path, how):
    tree = _tree()
    if how == "standard":  # the defaults a user has
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()
    else:
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=how != "plain",
                                              use_zarr3=how == "zarr3")
        ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(tree))
    return tree


def _equal(restored, expected):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        if isinstance(b, int):  # a Python int placed on devices is a (32-bit) jax int
            assert int(a) == b
            continue
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module", params=["standard", "plain", "zarr3"])
def orbax_checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    return str(path), _write(path, request.param)


def test_restore_without_target_gives_the_tree_as_saved(orbax_checkpoint):
    path, tree = orbax_checkpoint
    saved = dcheckpoint.restore_pytree(path)
    assert set(saved) == {"params", "opt", "step", "count"}
    assert isinstance(saved["opt"], list) and saved["count"] == 3
    assert saved["params"]["dense"]["bias"].dtype == ml_dtypes.bfloat16
    _equal(saved, tree)


def test_restore_onto_another_mesh_and_one_device(orbax_checkpoint):
    path, tree = orbax_checkpoint
    other = jax.make_mesh((2, 4), ("x", "y"))
    target = dcheckpoint.target_from_metadata(path, other)  # the saved axis names
    restored = dcheckpoint.restore_pytree(path, target)
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding.mesh.shape == {"x": 2, "y": 4} and kernel.sharding.spec == P("x", "y")
    # Each device holds its own slice of the new mesh.
    for shard in kernel.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      np.asarray(tree["params"]["dense"]["kernel"])[shard.index])
    _equal(restored, tree)
    one = dcheckpoint.restore_pytree(
        path, dcheckpoint.target_from_metadata(path, SingleDeviceSharding(jax.devices()[1])))
    assert one["opt"][1].devices() == {jax.devices()[1]}
    _equal(one, tree)


def test_restore_into_an_abstract_target(orbax_checkpoint):
    path, tree = orbax_checkpoint
    abstract = jax.eval_shape(_tree)
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(
        (8, 8), jnp.float32, sharding=NamedSharding(MESH, P(None, "x")))
    with jax.set_mesh(MESH):  # eval_shape's shardings name an abstract mesh
        restored = dcheckpoint.restore_pytree(path, abstract)
    assert restored["params"]["dense"]["kernel"].sharding.spec == P(None, "x")
    assert restored["count"] == 3
    _equal(restored, tree)


def test_migrate_by_restoring_and_saving_with_dcheckpoint(orbax_checkpoint, tmp_path):
    path, tree = orbax_checkpoint
    with jax.set_mesh(MESH):
        state = dcheckpoint.restore_pytree(path, jax.eval_shape(_tree))
    moved = dcheckpoint.save_pytree(str(tmp_path / "moved"), state)
    assert dcheckpoint.read_metadata(moved).writer.get("library") != "orbax-checkpoint"
    _equal(dcheckpoint.restore_pytree(moved), tree)


def test_inspect_lists_an_orbax_checkpoint_and_verify_says_what_it_is(orbax_checkpoint,
                                                                       capsys):
    path, _ = orbax_checkpoint
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "6 arrays" in out.splitlines()[0] and "by orbax-checkpoint" in out.splitlines()[0]
    assert "[x, y] on mesh x=4 y=2" in out and "bfloat16" in out
    assert main(["verify", path]) != 0
    assert "is an Orbax checkpoint" in capsys.readouterr().err


def _crafted(tmp_path, edit):
    path = tmp_path / "ckpt"
    _write(path, "plain")
    metadata = json.loads((path / "_METADATA").read_text())
    edit(metadata)
    (path / "_METADATA").write_text(json.dumps(metadata))
    return str(path)


def test_crafted_orbax_metadata_is_refused(tmp_path):
    garbled = tmp_path / "garbled"
    _write(garbled, "plain")
    (garbled / "_METADATA").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"_METADATA is not JSON"):
        dcheckpoint.read_metadata(str(garbled))

    def escape(metadata):  # a key that would name the directory above the checkpoint
        entry = next(iter(metadata["tree_metadata"].values()))
        entry["key_metadata"] = [{"key": "..", "key_type": 2}]
    with pytest.raises(CorruptCheckpointError, match=r"'\.\.' is not a path inside"):
        dcheckpoint.read_metadata(_crafted(tmp_path / "a", escape))

    def missing(metadata):  # a name inside, with no array there
        entry = next(iter(metadata["tree_metadata"].values()))
        entry["key_metadata"] = [{"key": "..", "key_type": 2}, {"key": "x", "key_type": 2}]
    with pytest.raises(CorruptCheckpointError, match=r"lists array '\.\.\.x', which cannot be "
                                                     r"opened as zarr .*NOT_FOUND"):
        dcheckpoint.read_metadata(_crafted(tmp_path / "e", missing))

    def slash(metadata):
        entry = next(iter(metadata["tree_metadata"].values()))
        entry["key_metadata"] = [{"key": "../../etc", "key_type": 2}]
    with pytest.raises(CorruptCheckpointError, match=r"'\.\./\.\./etc' is not a path inside"):
        dcheckpoint.read_metadata(_crafted(tmp_path / "b", slash))

    def string_leaf(metadata):
        entry = next(iter(metadata["tree_metadata"].values()))
        entry["value_metadata"]["value_type"] = "string"
    with pytest.raises(CheckpointMismatchError, match=r"is an Orbax 'string', which has no"):
        dcheckpoint.read_metadata(_crafted(tmp_path / "c", string_leaf))

    def no_tree(metadata):
        del metadata["tree_metadata"]
    with pytest.raises(CorruptCheckpointError, match=r"expected Orbax's"):
        dcheckpoint.read_metadata(_crafted(tmp_path / "d", no_tree))


def test_an_orbax_manager_step_names_its_item_directory(tmp_path):
    with ocp.CheckpointManager(str(tmp_path / "run")) as manager:
        manager.save(12, args=ocp.args.StandardSave({"w": jnp.arange(4.0)}))
        manager.wait_until_finished()
    step = str(tmp_path / "run" / "12")
    with pytest.raises(dcheckpoint.CheckpointNotFoundError,
                       match=r"a step of an Orbax CheckpointManager; its items are \['default'\]"
                             r": restore '.*/run/12/default'"):
        dcheckpoint.restore_pytree(step)
    restored = dcheckpoint.restore_pytree(f"{step}/default")
    np.testing.assert_array_equal(restored["w"], np.arange(4.0, dtype=np.float32))
