"""restore_pytree(path) gives a checkpoint back as saved, and target_from_metadata builds
the Orbax-style target (ShapeDtypeStructs with shardings) to restore onto a new mesh."""

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dcheckpoint
from dcheckpoint import AutoTrackable, Checkpoint, Variable
from dcheckpoint._metadata import _digest
from dcheckpoint.errors import CorruptCheckpointError
from mesh import Mesh
from tests.mp_util import REPO_ROOT
from tests.readme_example import run_readme_example


class Pair(NamedTuple):
    first: np.ndarray
    second: np.ndarray


def _mesh(shape, names=("data", "model")):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _put(values, sharding):
    return jax.make_array_from_callback(values.shape, sharding, lambda idx: values[idx])


def _assert_equal_trees(got, expected):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert isinstance(a, np.ndarray), type(a)
        assert a.dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, np.asarray(b))


def test_save_pytree_comes_back_as_nested_dicts_and_lists(tmp_path):
    tree = {
        "params": {"dense": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.zeros(3)}},
        "layers": [np.arange(2), (np.arange(3), np.int32(7))],
        "pair": Pair(np.ones(2), np.full(2, 2.0)),
        "step": np.int64(5),
    }
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), tree)
    out = dcheckpoint.restore_pytree(path)
    expected = {
        "params": tree["params"],
        "layers": [np.arange(2), [np.arange(3), np.asarray(np.int32(7))]],
        "pair": {"first": np.ones(2), "second": np.full(2, 2.0)},  # a NamedTuple: a dict
        "step": np.asarray(np.int64(5)),
    }
    _assert_equal_trees(out, expected)
    assert isinstance(out["layers"][1], list)


def test_a_single_leaf_and_a_dict_named_value_stay_apart(tmp_path):
    leaf = dcheckpoint.save_pytree(str(tmp_path / "leaf"), np.arange(4))
    np.testing.assert_array_equal(dcheckpoint.restore_pytree(leaf), np.arange(4))
    named = dcheckpoint.save_pytree(str(tmp_path / "named"), {"value": np.arange(4)})
    out = dcheckpoint.restore_pytree(named)
    assert list(out) == ["value"]
    np.testing.assert_array_equal(out["value"], np.arange(4))
    assert dcheckpoint.restore_pytree(dcheckpoint.save_pytree(str(tmp_path / "e"), {})) == {}


def test_sharded_arrays_come_back_whole_on_the_host(tmp_path):
    values = np.arange(64, dtype=np.float32).reshape(8, 8)
    sharded = _put(values, NamedSharding(_mesh((4, 2)), P("data", "model")))
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"w": sharded})
    out = dcheckpoint.restore_pytree(path)
    assert isinstance(out["w"], np.ndarray)
    np.testing.assert_array_equal(out["w"], values)


def test_a_real_optax_state_comes_back_by_field_name(tmp_path):
    params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    opt_state = optax.adam(1e-3).init(params)
    _, opt_state = optax.adam(1e-3).update(params, opt_state, params), opt_state
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"params": params, "opt": opt_state})
    out = dcheckpoint.restore_pytree(path)
    adam = out["opt"][0]  # (ScaleByAdamState, EmptyState): the empty state holds no array
    assert set(adam) == {"count", "mu", "nu"} and len(out["opt"]) == 1
    np.testing.assert_array_equal(adam["mu"]["w"], np.asarray(opt_state[0].mu["w"]))
    np.testing.assert_array_equal(out["params"]["b"], np.ones(2))


def test_checkpoint_comes_back_by_graph_path_with_save_counter(tmp_path):
    model = AutoTrackable()
    model.dense = {"kernel": Variable(jnp.arange(6.0).reshape(3, 2))}
    model.layers = [Variable(jnp.zeros(2)), np.arange(3)]
    model.shared = model.layers[1]      # one object under two paths
    model.self_ref = model              # a cycle
    model.name = "run-1"                # a string: kept in the object graph
    path = Checkpoint(model=model, opt=Pair(np.ones(1), np.zeros(1))).save(str(tmp_path / "c"))
    out = dcheckpoint.restore_pytree(path)
    assert set(out) == {"model", "opt", "save_counter"}
    np.testing.assert_array_equal(out["save_counter"], 1)
    np.testing.assert_array_equal(out["model"]["dense"]["kernel"], np.arange(6.0).reshape(3, 2))
    assert isinstance(out["model"]["layers"], list)
    assert out["model"]["shared"] is out["model"]["layers"][1]
    assert "self_ref" not in out["model"]  # a cycle: the result stays a tree
    assert set(out["opt"]) == {"first", "second"}
    assert out["model"]["name"] == "run-1"
    # kernel, layers 0 and 1, shared, name, opt first and second, save_counter
    assert len(jax.tree.leaves(out)) == 8


def test_a_checkpoint_with_shared_objects_restores_onto_its_own_or_a_built_target(tmp_path):
    tied = Variable(jnp.arange(4.0))
    model = AutoTrackable()
    model.embed, model.unembed = tied, tied  # tied weights: saved once, at model/embed
    model.self_ref = model
    path = Checkpoint(model=model).write(str(tmp_path / "c"))
    assert set(dcheckpoint.read_metadata(path).arrays) == {"model/embed"}

    sharding = NamedSharding(_mesh((2, 4)), P("model"))
    out = dcheckpoint.restore_pytree(path, {"model": {"embed": sharding, "unembed": None}})
    assert out["model"]["embed"].sharding == sharding
    assert isinstance(out["model"]["unembed"], np.ndarray)
    for leaf in out["model"].values():
        np.testing.assert_array_equal(np.asarray(leaf), np.arange(4.0))

    target = dcheckpoint.target_from_metadata(path, sharding)
    assert set(target["model"]) == {"embed", "unembed"}
    out = dcheckpoint.restore_pytree(path, target)
    assert out["model"]["embed"] is out["model"]["unembed"]  # one read, one array
    assert out["model"]["embed"].sharding == sharding


def test_crafted_alias_cycles_are_refused_not_a_recursion(tmp_path):
    path = Checkpoint(a={"x": np.ones(1)}).write(str(tmp_path / "c"))
    meta_file = os.path.join(path, "dcheckpoint.json")
    doc = json.load(open(meta_file))
    graph = doc["checkpoint"]["object_graph"]
    for i in range(3000):  # a chain of containers, each holding the next
        graph["nodes"][f"n{i}"] = {"kind": "dict", "children": ["c"]}
        graph["aliases"][f"n{i}/c"] = f"n{i + 1}"
    graph["nodes"]["n3000"] = {"kind": "dict", "children": []}
    graph["nodes"][""]["children"].append("n0")
    doc["sha256"] = _digest(doc["checkpoint"])
    json.dump(doc, open(meta_file, "w"))
    with pytest.raises(CorruptCheckpointError, match="nests too deeply"):
        dcheckpoint.restore_pytree(path)
    graph["nodes"]["a"]["children"].append("gone")  # a child with neither node nor array
    doc["sha256"] = _digest(doc["checkpoint"])
    json.dump(doc, open(meta_file, "w"))
    with pytest.raises(CorruptCheckpointError, match="'a/gone' is in the object graph"):
        dcheckpoint.restore_pytree(path)


def test_target_from_metadata_reshards_from_4x2_onto_2x4(tmp_path):
    """The Orbax-style flow: read metadata, build a target, restore onto a new mesh."""
    saved_mesh = _mesh((4, 2))
    kernel = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    bias = np.arange(8, dtype=np.int32)
    tree = {"kernel": _put(kernel, NamedSharding(saved_mesh, P("data", "model"))),
            "bias": _put(bias, NamedSharding(saved_mesh, P("data"))),
            "step": np.int32(3)}
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), tree)

    new_mesh = _mesh((2, 4))
    target = dcheckpoint.target_from_metadata(dcheckpoint.read_metadata(path), new_mesh)
    # Saved axis names, on the new mesh; "model" (4 now) does not divide 6: unsharded.
    assert target["kernel"].sharding == NamedSharding(new_mesh, P("data", None))
    assert target["bias"].sharding == NamedSharding(new_mesh, P("data"))
    assert target["step"].shape == () and target["step"].dtype == np.int32
    out = dcheckpoint.restore_pytree(path, target)
    for name, values in [("kernel", kernel), ("bias", bias)]:
        assert out[name].sharding == target[name].sharding
        for shard in out[name].addressable_shards:
            np.testing.assert_array_equal(shard.data, values[shard.index])
    np.testing.assert_array_equal(out["step"], 3)


def test_target_from_metadata_sharding_rules(tmp_path):
    values = np.arange(32, dtype=np.float32).reshape(8, 4)
    saved = _put(values, NamedSharding(_mesh((4, 2)), P("data", "model")))
    path = dcheckpoint.save_pytree(str(tmp_path / "p"), {"a": {"w": saved}})
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[3])

    replicated = NamedSharding(_mesh((2, 4)), P())
    tree = dcheckpoint.target_from_metadata(path, replicated)
    assert tree["a"]["w"].sharding == replicated

    seen = []

    def rule(name, meta):
        seen.append((name, meta.shape))
        return one_device

    out = dcheckpoint.restore_pytree(path, dcheckpoint.target_from_metadata(path, rule))
    assert seen == [("a/w", (8, 4))] and out["a"]["w"].devices() == {jax.devices()[3]}
    np.testing.assert_array_equal(np.asarray(out["a"]["w"]), values)

    ours = Mesh(("data", "model"), (8, 1))  # a mesh.Mesh works as well as a jax Mesh
    tree = dcheckpoint.target_from_metadata(path, ours)
    assert tree["a"]["w"].sharding == NamedSharding(ours.jax_mesh, P("data", "model"))

    # No sharding: what jax.eval_shape's abstract value stands for, an uncommitted
    # jax.Array on the default device.
    plain = dcheckpoint.restore_pytree(path, dcheckpoint.target_from_metadata(path))
    assert isinstance(plain["a"]["w"], jax.Array) and not plain["a"]["w"].committed
    np.testing.assert_array_equal(np.asarray(plain["a"]["w"]), values)
    with pytest.raises(TypeError, match="sharding must be None, a jax.sharding.Sharding"):
        dcheckpoint.target_from_metadata(path, "data")
    with pytest.raises(TypeError, match="Array 'a/w': the sharding rule returned a str"):
        dcheckpoint.target_from_metadata(path, lambda name, meta: "data")


def test_target_from_metadata_of_a_checkpoint_matches_restore_without_target(tmp_path):
    path = Checkpoint(t={"sp ace": np.arange(3)}, l=[np.ones(2)]).save(str(tmp_path / "c"))
    target = dcheckpoint.target_from_metadata(path)
    as_saved = dcheckpoint.restore_pytree(path)
    assert jax.tree.structure(target) == jax.tree.structure(as_saved)
    out = dcheckpoint.restore_pytree(path, target)
    np.testing.assert_array_equal(out["t"]["sp ace"], np.arange(3))


def test_readme_restore_flow_runs_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it emulates its own
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    _, done = run_readme_example("target_from_metadata", tmp_path, "/tmp/readme-pytree",
                                 tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ndarray", "P('data', 'model')"]


def test_a_real_flax_train_state_as_saved_and_onto_a_mesh(tmp_path):
    from flax import linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.adam(1e-3))
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    path = dcheckpoint.save_pytree(str(tmp_path / "ts"), state)

    saved = dcheckpoint.restore_pytree(path)  # a TrainState comes back as a dict
    assert set(saved) == {"step", "params", "opt_state"}
    np.testing.assert_array_equal(saved["step"], 1)
    kernel = np.asarray(state.params["params"]["Dense_1"]["kernel"])
    np.testing.assert_array_equal(saved["params"]["params"]["Dense_1"]["kernel"], kernel)
    np.testing.assert_array_equal(saved["opt_state"][0]["mu"]["params"]["Dense_1"]["kernel"],
                                  np.asarray(state.opt_state[0].mu["params"]["Dense_1"]["kernel"]))

    mesh = _mesh((2, 4))
    restored = dcheckpoint.restore_pytree(path, dcheckpoint.target_from_metadata(path, mesh))
    assert restored["params"]["params"]["Dense_1"]["kernel"].sharding.mesh == mesh
    rebuilt = dcheckpoint.restore_pytree(path, jax.tree.map(lambda _: None, state))
    assert isinstance(rebuilt, train_state.TrainState) and int(rebuilt.step) == 1
